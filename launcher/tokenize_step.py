"""The tokenizing pre-step: after validation and before planning, for every backend, the launcher
runs `python -m trainer.tokenized` in a child process (this process imports no transformers) and
the plan records the cache folder and its sample counts. Ranks only memory-map that folder, so
nobody tokenizes inside a collective timeout, and a rerun or a requeue finds the same folder.

A dry run tokenizes nothing: it reads the counts of the cache entry the pre-step would use when it
is there (local data and tokenizer: the key is computed here, launcher/hf_config.py cache_key),
else the plan says the samples are known after tokenization.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.errors import ConfigError
from launcher.hf_config import TextDataSpec, cached_entry, source_folder
from launcher.schema import RunConfig

ROOT = Path(__file__).resolve().parent.parent  # the folder holding launcher/ and trainer/


@dataclass(kw_only=True)
class Tokenized:
    """What the plan knows of the tokenized data (empty folder: not tokenized yet, dry run)."""

    folder: str = ""
    hit: bool = False  # found in the cache: nothing was tokenized
    seconds: float = 0.0
    samples: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    packed_samples: dict[str, int] = field(default_factory=dict)
    pad_token_id: int = 0
    labelled: dict[str, int] = field(default_factory=dict)  # tokens with a label (a loss), per split

    def count(self, split: str, *, packing: bool) -> int | None:
        counts = self.packed_samples if packing else self.samples
        return counts.get(split) if self.folder else None


def cache_root(cfg: RunConfig) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ringleader" / "tokenized"


def stdlib_instruct_dir(cfg: RunConfig) -> Path:
    """Where the shipped instruction set's files are written once (they depend on the Python)."""
    return cache_root(cfg) / f"stdlib_instruct-py{sys.version_info.major}.{sys.version_info.minor}"


def text_spec(cfg: RunConfig) -> TextDataSpec:
    """The data group as the pre-step's settings (every one of them is in the cache key)."""
    d = cfg.data
    paths, validation_paths = list(d.paths), list(d.validation_paths)
    fields: dict[str, Any] = {}
    if d.name == "stdlib_instruct":
        kind = "messages" if d.format == "messages" else "alpaca"
        folder = stdlib_instruct_dir(cfg)
        paths, validation_paths = [str(folder / f"train.{kind}.jsonl")], [str(folder / f"validation.{kind}.jsonl")]
        fields = {"prompt_field": "instruction", "input_field": "input", "completion_field": "output", "messages_field": "messages"}
    else:
        fields = {k: getattr(d, k) for k in ("text_field", "prompt_field", "input_field", "completion_field", "messages_field")}
    return TextDataSpec(
        paths=paths, validation_paths=validation_paths, dataset=d.dataset, dataset_config=d.dataset_config, revision=d.revision,
        split=d.split, validation_split=d.validation_split, validation_fraction=d.validation_fraction,
        seed=cfg.train.seed if cfg.train.data_seed is None else cfg.train.data_seed,
        format=d.format, prompt_template=d.prompt_template, chat_template=d.chat_template, train_on_prompt=d.train_on_prompt,
        max_length=d.seq_len, **fields,
    )


def from_meta(folder: Path, *, hit: bool, seconds: float = 0.0) -> Tokenized:
    meta = json.loads((folder / "meta.json").read_text())
    return Tokenized(
        folder=str(folder), hit=hit, seconds=seconds, samples=meta["samples"], tokens=meta["tokens"],
        packed_samples=meta["packed_samples"], pad_token_id=int(meta.get("pad_token_id", 0)), labelled=meta.get("labelled", {}),
    )


def cached(cfg: RunConfig) -> Tokenized:
    """The dry run's view: the cache entry's counts when it is there, else an empty Tokenized."""
    tok = source_folder(cfg.model.tokenizer_source, revision=cfg.model.revision)
    if tok is None:
        return Tokenized()
    folder = cached_entry(text_spec(cfg), tok, cache_root(cfg))
    return from_meta(folder, hit=True) if folder is not None else Tokenized()


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(args: list[str]) -> str:
    """Run a pre-step module; its one-line error becomes this launch's ConfigError."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=child_env(), cwd=ROOT)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        mine = [line for line in lines if line.startswith("ringleader: error: ")]
        if mine:
            raise ConfigError("", mine[-1].removeprefix("ringleader: error: "))
        raise ConfigError("data", f"tokenizing failed ({lines[-1] if lines else f'exit {proc.returncode}'}); see python -m {args[1]}")
    return proc.stdout


def pretokenize(cfg: RunConfig) -> Tokenized:
    """Tokenize into the cache (or find the entry there); the counts for the plan."""
    if cfg.data.name == "stdlib_instruct":
        spec = text_spec(cfg)
        if not all(Path(p).is_file() for p in (*spec.paths, *spec.validation_paths)):
            run_child(["-m", "trainer.stdlib_instruct", str(stdlib_instruct_dir(cfg))])
    # A cache hit whose key the launcher computes itself (local data and tokenizer) needs no child:
    # the child imports transformers and datasets (seconds) only to find the same folder.
    found = cached(cfg)
    if found.folder:
        return found
    m = cfg.model
    args = ["-m", "trainer.tokenized", "--cache-dir", str(cache_root(cfg)), "--tokenizer", m.tokenizer_source, "--spec", json.dumps(text_spec(cfg).key()), "--num-proc", str(cfg.data.num_proc)]
    if m.revision:
        args += ["--revision", m.revision]
    if m.trust_remote_code:
        args.append("--trust-remote-code")
    out = run_child(args)
    got = json.loads(out.strip().splitlines()[-1])
    return from_meta(Path(got["folder"]), hit=bool(got["hit"]), seconds=float(got["seconds"]))
