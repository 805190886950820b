"""Tokenization CPU time: ringleader's pre-step (trainer/tokenized.py prepare: load, key, map,
labels, the memory-mapped .npy cache) over a plain `datasets.map(batched=True)` of the same JSONL
with the same tokenizer and number of processes. Goals: at most 1.0x; a cached rerun at most 5%
of the first.

The data: the shipped instruction set (trainer/stdlib_instruct.py, 530 train records) repeated
`--repeat` times, as Alpaca JSONL (prompt_completion) and as one text field (text). The plain
baseline tokenizes exactly the text ringleader tokenizes (the Alpaca-rendered prompt followed by
the completion; the text field), in ONE tokenizer call a sample, with truncation to the same
max_length, as a Trainer user's map function does; ringleader encodes prompt and completion
apart (the model trains on the tokens it sees at inference) and builds the aligned labels.
Both sides load the JSONL through `datasets` (its Arrow cache warm: converted once before the
timing) and write the map's result to a cache file; ringleader also writes and fsyncs its .npy
files. Both run `--rounds` times in ABBA order; each round's ratio is one sample, the result is
the median. CPU time: time.process_time (every thread, the tokenizer's Rust threads included)
plus the children's (num_proc > 1). Load average recorded: the machine is shared.

    python -m benchmarks.bench_tokenize [--repeat 20] [--rounds 4] [--num-proc 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")

from benchmarks.common import ROOT, record  # noqa: E402

MAX_LENGTH = 1024


def cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def write_data(folder: Path, repeat: int) -> dict[str, Path]:
    from trainer import stdlib_instruct

    records = stdlib_instruct.records("train") * repeat
    alpaca, text = folder / "alpaca.jsonl", folder / "text.jsonl"
    with open(alpaca, "w") as a, open(text, "w") as t:
        for r in records:
            a.write(json.dumps(r) + "\n")
            t.write(json.dumps({"text": f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}"}) + "\n")
    return {"prompt_completion": alpaca, "text": text}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=20, help="copies of the 530 instruction records")
    p.add_argument("--rounds", type=int, default=4, help="ABBA rounds per format")
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--formats", nargs="+", default=["prompt_completion", "text"])
    args = p.parse_args()

    import datasets

    from trainer import text_data, tokenized
    from trainer.text_data import TextDataSpec

    datasets.disable_progress_bars()
    tok = text_data.load_tokenizer(str(ROOT / "trainer" / "assets" / "llama_tiny"))
    nproc = args.num_proc if args.num_proc > 1 else None
    results: dict = {}
    started, load_at_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_data(work, args.repeat)
        for fmt in args.formats:
            path = files[fmt]
            spec = TextDataSpec(paths=[str(path)], format=fmt, max_length=MAX_LENGTH, validation_fraction=0.0)
            hf_cache = str(work / "hf")
            datasets.load_dataset("json", data_files=[str(path)], split="train", cache_dir=hf_cache)  # Arrow conversion, once, before any timing

            def plain_fn(batch: dict, fmt: str = fmt) -> dict:
                if fmt == "text":
                    texts = batch["text"]
                else:
                    inputs = batch.get("input") or [""] * len(batch["instruction"])
                    texts = [text_data._prompt(i, x, spec) + str(o) for i, x, o in zip(batch["instruction"], inputs, batch["output"])]
                return tok(texts, truncation=True, max_length=MAX_LENGTH)

            def plain() -> tuple[float, float, int]:
                c, w = cpu(), time.perf_counter()
                ds = datasets.load_dataset("json", data_files=[str(path)], split="train", cache_dir=hf_cache)
                out = ds.map(plain_fn, batched=True, num_proc=nproc, remove_columns=ds.column_names, load_from_cache_file=False)
                return cpu() - c, time.perf_counter() - w, len(out)

            def ours(cache: Path) -> tuple[float, float, tokenized.Prepared]:
                c, w = cpu(), time.perf_counter()
                got = tokenized.prepare(spec, tokenizer=tok, cache_dir=cache, num_proc=args.num_proc, datasets_cache=hf_cache, tokenizer_folder=ROOT / "trainer" / "assets" / "llama_tiny")
                return cpu() - c, time.perf_counter() - w, got

            rounds = []
            for r in range(args.rounds):
                order = ("ours", "plain") if r % 2 == 0 else ("plain", "ours")
                sample: dict = {}
                for side in order:
                    if side == "plain":
                        sample["plain_cpu"], sample["plain_wall"], sample["samples"] = plain()
                    else:
                        cache = work / f"cache-{fmt}-{r}"
                        sample["ours_cpu"], sample["ours_wall"], got = ours(cache)
                        assert not got.hit
                        sample["cached_cpu"], sample["cached_wall"], again = ours(cache)
                        assert again.hit
                        sample["tokens"] = got.tokens["train"]
                        shutil.rmtree(cache)
                rounds.append({k: round(v, 4) if isinstance(v, float) else v for k, v in sample.items()})
                print(f"{fmt} round {r + 1}: cpu ours {sample['ours_cpu']:.2f}s plain {sample['plain_cpu']:.2f}s ratio {sample['ours_cpu'] / sample['plain_cpu']:.3f}; cached {sample['cached_wall']:.3f}s", file=sys.stderr, flush=True)
            med = lambda key: statistics.median(x[key] for x in rounds)  # noqa: E731
            results[fmt] = {
                "samples": rounds[0]["samples"], "tokens": rounds[0]["tokens"],
                "cpu_ratio_median": round(statistics.median(x["ours_cpu"] / x["plain_cpu"] for x in rounds), 3),
                "cpu_ratios": [round(x["ours_cpu"] / x["plain_cpu"], 3) for x in rounds],
                "wall_ratio_median": round(statistics.median(x["ours_wall"] / x["plain_wall"] for x in rounds), 3),
                "ours_cpu_s": round(med("ours_cpu"), 3), "plain_cpu_s": round(med("plain_cpu"), 3),
                "cached_rerun_wall_s": round(med("cached_wall"), 4),
                "cached_over_first_wall": round(statistics.median(x["cached_wall"] / x["ours_wall"] for x in rounds), 4),
                "goal_cpu_ratio": 1.0, "goal_cached_over_first": 0.05,
                "rounds": rounds,
            }
    command = f"python -m benchmarks.bench_tokenize --repeat {args.repeat} --rounds {args.rounds} --num-proc {args.num_proc}"
    record("tokenize", {"results": results, "load_average_at_start": load_at_start, "seconds": round(time.perf_counter() - started), "command": command})


if __name__ == "__main__":
    main()
