"""Host memory while 2 ranks on one node load pretrained transformers weights, by strategy: the
node's peak memory above what the ranks held before loading, over one copy of the weights.
Goal (issue 13): zero3 and fsdp at most 1.3x; ddp holds one copy per rank (~2x), as DDP needs.

Each rank runs ringleader's own loading path, nothing else: trainer.build.build_model with the
strategy's plan (ddp: from_pretrained on every rank; zero3: built partitioned inside
deepspeed.zero.Init, rank 0 reading each weight into it; fsdp: a meta build), then for fsdp the
strategy's wrap (shard per decoder layer, allocate the shards, stream rank 0's weights in).
Optimizer state is not part of it (DeepSpeed's initialize would add it).

Measured on each rank from /proc/self, after importing and running the model's code once on the
meta device (its lazy imports are no part of loading) and ending once every weight the rank holds
has been read (transformers 5 maps safetensors lazily): a 5 ms sampler of RssAnon (memory the rank
allocated) and RssFile (pages of memory-mapped files, the safetensors file among them: one copy on
the node however many ranks map it), VmHWM reset through clear_refs, Pss from smaps_rollup (shared
libraries' shares move with other processes on a shared machine: noisy), and RssAnon after
malloc_trim (what of the peak was freed memory the allocator kept). Rank 0 also samples, with
mincore, how much of the weights file sits in the page cache, mapped or not (the file's cache is
dropped before each strategy's run, so each starts cold): a loader that reads the file without
mapping it leaves its pages in no process's RSS, and they must still count. Each over the
weights' bytes, summed over the ranks:
  node   peak RssAnon deltas + the file counted once, at its largest: the peak RssFile delta or the
         peak page cache of the weights file, whichever is larger. The figure the goal is about
  anon   peak RssAnon deltas: private copies, transients included
  file_cache  peak page cache of the weights file (mapped or read)
  anon_after_trim   what the ranks still hold privately once loaded
  rss    VmHWM deltas: counts the mapped file once per rank that touched it; an upper bound
The model: the shipped tiny Llama's architecture scaled to ~88 M parameters (352 MB fp32), random
weights saved once as a from_pretrained folder.

    python -m benchmarks.bench_hf_load [--strategies ddp fsdp zero3] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, env, record, run  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SCALE = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64}


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def rollup() -> dict[str, int]:
    """Pss (this process's share of every page it maps: a page mapped by both ranks counts half in
    each), Pss_Anon, Pss_File, in bytes."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Pss_File"):
                out[key] = int(value.split()[0]) * 1024
    return out


def snapshot() -> dict[str, int]:
    return {**status(), **rollup()}


class FileCache:
    """How many bytes of a file sit in the page cache (mincore over a mapping never touched, so the
    mapping itself makes nothing resident)."""

    def __init__(self, path: str) -> None:
        import ctypes
        import mmap

        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        self.libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
        self.addr = self.libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        os.close(fd)
        self.pages = (self.size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        self.vec = (ctypes.c_ubyte * self.pages)()

    def cached(self) -> int:
        import mmap

        if self.libc.mincore(self.addr, self.size, self.vec) != 0:
            raise OSError("mincore failed")
        return (self.pages - bytes(self.vec).count(0)) * mmap.PAGESIZE


def drop_cache(path: str) -> None:
    """Write back and drop a file's pages from the page cache: each strategy's load starts cold."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


class Sampler(threading.Thread):
    def __init__(self, cache: FileCache | None = None) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0, "Pss": 0, "Pss_Anon": 0, "file_cache": 0}
        self.cache = cache
        self.stop = threading.Event()

    def sample(self) -> None:
        s = snapshot()
        s["file_cache"] = self.cache.cached() if self.cache is not None else 0
        for k in self.peak:
            self.peak[k] = max(self.peak[k], s[k])

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.005)


def worker(folder: str, strategy: str) -> None:
    import torch
    import torch.distributed as dist

    from launcher.deepspeed_config import deepspeed_config
    from launcher.registry import HF_TARGET
    from launcher.schema import RunConfig
    from trainer.build import build_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = RunConfig()
    cfg.model._target_, cfg.model.name_or_path, cfg.model.name = HF_TARGET, folder, "hf"
    cfg.strategy.name = strategy
    ds = deepspeed_config(cfg, world_size=world) if strategy.startswith("zero") else None
    if strategy == "fsdp":
        from trainer.strategies.fsdp import FSDPStrategy  # imported before the baseline, as the others' modules
    if ds is not None:
        import deepspeed  # noqa: F401
        import transformers.integrations  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    # The model's code imported and run once before the baseline, on the meta device (no memory):
    # the lazy imports and first-call set-up it triggers (~120 MiB a rank) are no part of loading.
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = snapshot()
    cache = FileCache(str(Path(folder) / "model.safetensors")) if rank == 0 else None
    cache_before = cache.cached() if cache is not None else 0
    sampler = Sampler(cache)
    sampler.start()
    model = build_model(cfg.model, strategy=strategy, seed=0, deepspeed=ds)
    if strategy == "fsdp":
        FSDPStrategy(cfg=cfg, device=torch.device("cpu")).wrap(model)
    # Loaded means usable: read every byte this rank holds of the weights (transformers 5 maps
    # safetensors lazily, so untouched weights would not be resident yet).
    with torch.no_grad():
        for param in model.parameters():
            held = getattr(param, "ds_tensor", None)
            held = held if held is not None else (param.to_local() if hasattr(param, "to_local") else param)
            float(held.float().sum()) if held.numel() else 0.0
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    after = snapshot()
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of `after` is freed memory the allocator kept
    trimmed = snapshot()
    mine = {
        "anon_after": after["RssAnon"] - before["RssAnon"],
        "anon_after_trim": trimmed["RssAnon"] - before["RssAnon"],
        "pss": sampler.peak["Pss"] - before["Pss"],
        "pss_after": after["Pss"] - before["Pss"],
        "anon": sampler.peak["RssAnon"] - before["RssAnon"],
        "file": sampler.peak["RssFile"] - before["RssFile"],
        "file_cache": sampler.peak["file_cache"] - cache_before,
        "rss": after["VmHWM"] - before["VmRSS"],
        "before_rss": before["VmRSS"],
    }
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        print("LOAD " + json.dumps(gathered), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategies", nargs="+", default=["ddp", "fsdp", "zero3"])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--worker", nargs=2, metavar=("FOLDER", "STRATEGY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    for k, v in OFFLINE.items():
        os.environ.setdefault(k, v)
    started, load_at_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    from trainer.hf_model import SHIPPED_TINY, HFModelSpec, build_causal_lm, save_pretrained_dir

    cfg = {**json.loads((SHIPPED_TINY / "config.json").read_text()), **SCALE}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_causal_lm(HFModelSpec(config=cfg, tokenizer=str(SHIPPED_TINY)), seed=0)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        params = sum(p.numel() for p in model.parameters())
        folder = save_pretrained_dir(Path(tmp) / "model", model.state_dict(), config=model.config)
        del model
        for r in range(args.repeat):
            for strategy in args.strategies if r % 2 == 0 else list(reversed(args.strategies)):
                drop_cache(str(folder / "model.safetensors"))
                proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "benchmarks" / "bench_hf_load.py"), "--worker", str(folder), strategy],
                           env=env(OMP_NUM_THREADS="1", **OFFLINE), timeout=900)
                ranks = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("LOAD "))[5:])
                entry = results.setdefault(strategy, {"runs": []})
                entry["runs"].append({
                    "pss_over_weights": round(sum(x["pss"] for x in ranks) / nbytes, 3),
                    "pss_after_over_weights": round(sum(x["pss_after"] for x in ranks) / nbytes, 3),
                    "anon_over_weights": round(sum(x["anon"] for x in ranks) / nbytes, 3),
                    "node_over_weights": round((sum(x["anon"] for x in ranks) + max(max(x["file"], x["file_cache"]) for x in ranks)) / nbytes, 3),
                    "file_cache_over_weights": round(max(x["file_cache"] for x in ranks) / nbytes, 3),
                    "anon_after_trim_over_weights": round(sum(x["anon_after_trim"] for x in ranks) / nbytes, 3),
                    "rss_over_weights": round(sum(x["rss"] for x in ranks) / nbytes, 3),
                    "per_rank_mib": [{k: round(v / 2**20) for k, v in x.items()} for x in ranks],
                })
                print(f"{strategy}: " + ", ".join(f"{k} {v}" for k, v in entry["runs"][-1].items() if k != "per_rank_mib"), file=sys.stderr, flush=True)
    for strategy, entry in results.items():
        entry["pss_over_weights"] = statistics.median(x["pss_over_weights"] for x in entry["runs"])
        entry["pss_after_over_weights"] = statistics.median(x["pss_after_over_weights"] for x in entry["runs"])
        entry["node_over_weights"] = statistics.median(x["node_over_weights"] for x in entry["runs"])
        entry["anon_after_trim_over_weights"] = statistics.median(x["anon_after_trim_over_weights"] for x in entry["runs"])
        entry["anon_over_weights"] = statistics.median(x["anon_over_weights"] for x in entry["runs"])
        entry["file_cache_over_weights"] = statistics.median(x["file_cache_over_weights"] for x in entry["runs"])
        entry["rss_over_weights"] = statistics.median(x["rss_over_weights"] for x in entry["runs"])
        entry["goal"] = "<= 1.3" if strategy in ("fsdp", "zero3") else "one copy per rank (~2.0)"
    record("hf_load", {
        "results": results, "weights_mib": round(nbytes / 2**20, 1), "parameters": params, "ranks": 2,
        "load_average_at_start": load_at_start, "seconds": round(time.perf_counter() - started),
        "command": "python -m benchmarks.bench_hf_load " + f"--strategies {' '.join(args.strategies)} --repeat {args.repeat}",
    })


if __name__ == "__main__":
    main()
