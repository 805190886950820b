"""What the launcher knows about a transformers model and its data without torch, transformers or
`datasets`: a parameter count from config.json alone (the plan sizes memory before any rank
starts), where a model or tokenizer lives (a local folder, the shipped tiny Llama, a hub id in the
local hub cache), the data settings (TextDataSpec) and the tokenized cache's key, which the
launcher and the tokenizing pre-step (trainer/tokenized.py) compute the same way.

Covers the common decoder-only families (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text,
phi3, gpt2); any other model_type returns None and the plan asks for `model.num_parameters`.
Checked against the models transformers builds from the same configs (tests/test_hf_model.py).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2")


def read_config(name_or_path: str | os.PathLike) -> dict[str, Any] | None:
    """config.json of a local folder (or the file itself); None when there is none (a hub id)."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def num_parameters(cfg: dict[str, Any]) -> int | None:
    """Parameters of the causal LM that AutoModelForCausalLM builds from `cfg`; None when the
    model_type is not one this function knows."""
    kind = cfg.get("model_type", "")
    if kind == "gpt2":
        return _gpt2(cfg)
    if kind not in LLAMA_LIKE:
        return None
    h, v, n = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or h // heads
    inter = cfg["intermediate_size"]
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    if kind == "qwen2":
        attn += heads * hd + 2 * kv * hd  # q, k, v biases (no o bias)
    elif cfg.get("attention_bias"):
        attn += heads * hd + 2 * kv * hd + h
    if kind == "phi3":
        attn = h * (heads * hd + 2 * kv * hd) + heads * hd * h  # fused qkv, same count
    mlp = 3 * h * inter + (2 * inter + h if cfg.get("mlp_bias") else 0)
    norms = {"gemma2": 4 * h, "gemma3_text": 4 * h}.get(kind, 2 * h)
    if kind in ("qwen3", "gemma3_text"):
        norms += 2 * hd  # q_norm, k_norm
    if kind == "olmo2":
        norms = 2 * h + heads * hd + kv * hd  # post-norms and q/k norms over the projections
    tied = cfg.get("tie_word_embeddings", kind in ("gemma", "gemma2", "gemma3_text"))
    return v * h + n * (attn + mlp + norms) + h + (0 if tied else v * h)


def _gpt2(cfg: dict[str, Any]) -> int:
    h, v, n = cfg["n_embd"], cfg["vocab_size"], cfg["n_layer"]
    inner = cfg.get("n_inner") or 4 * h
    layer = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h)
    tied = cfg.get("tie_word_embeddings", True)
    return v * h + cfg["n_positions"] * h + n * layer + 2 * h + (0 if tied else v * h)


def has_chat_template(tokenizer_dir: str | os.PathLike) -> bool | None:
    """Whether a local tokenizer folder carries a chat template (tokenizer_config.json's
    "chat_template", or a chat_template.jinja / .json file, as transformers reads them); None when
    the folder is not local (a hub id: the ranks' pre-step finds out)."""
    folder = Path(os.path.expanduser(str(tokenizer_dir)))
    if not folder.is_dir():
        return None
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file() or (folder / "additional_chat_templates").is_dir():
        return True
    cfg = folder / "tokenizer_config.json"
    return bool(cfg.is_file() and json.loads(cfg.read_text()).get("chat_template"))


def record_fields(path: str | os.PathLike) -> list[str]:
    """The field names of a local data file's first record, read without `datasets`: JSONL (first
    line), JSON (first object of a list), CSV (header), Parquet (schema, through pyarrow)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return list(json.loads(line))
        return []
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        # A list of records, or one object (a record, or a dict of columns: its keys either way).
        first = data[0] if isinstance(data, list) and data else data
        return list(first) if isinstance(first, dict) else []
    if suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), [])
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    raise ValueError(f"data.paths: {path} is not .jsonl/.json/.csv/.parquet")


# ---------------------------------------------------------------- where a model lives

PKG_PREFIX = "pkg:"  # a path inside an installed package of ringleader's: pkg:trainer/assets/llama_tiny


def package_path(value: str) -> str:
    """`pkg:trainer/assets/llama_tiny` as an absolute path inside the installed package (found
    with importlib's finder, which locates the package without importing it); anything else as given."""
    if not value.startswith(PKG_PREFIX):
        return value
    import importlib.util

    package, _, rest = value[len(PKG_PREFIX):].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{value}: no installed package {package!r}")
    return str(Path(list(found.submodule_search_locations)[0]) / rest)


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub id: it exists, or is written as a path (absolute, ./, ~, or more
    than one '/': a hub id is `name` or `org/name`)."""
    p = os.path.expanduser(name_or_path)
    return os.path.exists(p) or name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") > 1


def hub_file(repo_id: str, filename: str, *, revision: str = "") -> Path | None:
    """A hub repository's file in the local hub cache, or None (not downloaded, or no such file)."""
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(repo_id, filename, revision=revision or None)
    return Path(got) if isinstance(got, str) else None


def source_folder(name_or_path: str, *, revision: str = "") -> Path | None:
    """The folder holding a model's or tokenizer's files: the local folder (a config.json's own
    folder for a file), or the hub cache's snapshot of a hub id when its config.json or
    tokenizer_config.json is cached; None when neither is here."""
    if looks_local(name_or_path):
        p = Path(os.path.expanduser(name_or_path))
        return p if p.is_dir() else p.parent if p.is_file() else None
    for name in ("config.json", "tokenizer_config.json"):
        got = hub_file(name_or_path, name, revision=revision)
        if got is not None:
            return got.parent
    return None


# What decides a tokenizer's output, and what a from_pretrained folder carries of it.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
)


def tokenizer_identity_of_files(folder: Path) -> dict[str, str]:
    """The tokenizer's part of the cache key: a SHA-256 of each of its files' bytes."""
    return {name: file_digest(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}


# ---------------------------------------------------------------- data settings and the cache key

FORMATS = ("text", "prompt_completion", "messages")
LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# Bumped when the code that turns records into tokens changes: every cache entry is then new.
ENCODING_VERSION = 2


@dataclass(kw_only=True)
class TextDataSpec:
    """Everything that decides the tokens and labels of the data (all of it is in the cache key).
    Built from the `data` group by the launcher (launcher/tokenize_step.py) and read by the
    pre-step (trainer/tokenized.py); `max_length` is data.seq_len."""

    paths: list[str] = field(default_factory=list)  # local .json/.jsonl/.parquet/.csv files or globs
    dataset: str = ""  # or a hub dataset id (load_dataset), e.g. "tatsu-lab/alpaca"
    dataset_config: str = ""  # the hub dataset's configuration name, if it has several
    revision: str = ""  # hub dataset revision (a commit pins it)
    validation_paths: list[str] = field(default_factory=list)  # local validation files (then no fraction is held out)
    split: str = "train"
    validation_split: str = ""  # a split of the dataset to evaluate on; else validation_fraction
    validation_fraction: float = 0.05  # of the records, picked by a seeded permutation
    seed: int = 0
    format: str = "text"  # text | prompt_completion | messages
    text_field: str = "text"
    prompt_field: str = "instruction"
    input_field: str = "input"  # optional second part of the prompt ("" when the data has none)
    completion_field: str = "output"
    prompt_template: str = "alpaca"  # "alpaca", or a str.format template using {prompt} and {input}
    messages_field: str = "messages"
    chat_template: str = ""  # Jinja; "" = the tokenizer's own
    train_on_prompt: bool = False
    max_length: int = 1024
    add_eos: bool = True

    def check(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format: {self.format!r} is not one of {', '.join(FORMATS)}; set data.format")
        if bool(self.paths) == bool(self.dataset):
            raise ValueError("data.paths / data.dataset: give local files in data.paths or a hub id in data.dataset (exactly one)")
        if self.validation_paths and not self.paths:
            raise ValueError("data.validation_paths: only with local training files in data.paths; for a hub dataset set data.validation_split")
        if self.max_length < 2:
            raise ValueError(f"data.seq_len: must be >= 2 for text data, got {self.max_length}; set e.g. data.seq_len=1024")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"data.validation_fraction: must be in [0, 1), got {self.validation_fraction}; set e.g. data.validation_fraction=0.05")
        if self.format == "prompt_completion" and self.prompt_template != "alpaca" and "{prompt}" not in self.prompt_template:
            raise ValueError("data.prompt_template: must be 'alpaca' or contain {prompt}; set e.g. data.prompt_template='{prompt}'")

    def key(self) -> dict[str, Any]:
        return asdict(self)


def data_files(spec: TextDataSpec, key: str = "paths") -> list[Path]:
    """The local files of spec.paths (or spec.validation_paths), globs expanded and sorted; each
    glob must match a file."""
    files: list[Path] = []
    for pattern in getattr(spec, key):
        found = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not found:
            raise ValueError(f"data.{key}: {pattern!r} matches no file; set data.{key} to existing .jsonl/.json/.parquet/.csv files")
        files.extend(found)
    kinds = {LOADERS.get(f.suffix.lower()) for f in files}
    if files and (None in kinds or len(kinds) != 1):
        raise ValueError(f"data.{key}: files must all be .json/.jsonl, .parquet or .csv (one kind), got {sorted({f.suffix for f in files})}; set data.{key}")
    return files


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def local_data_identity(spec: TextDataSpec) -> dict[str, Any]:
    """Local files: their bytes (a hub dataset's identity needs `datasets`: trainer/tokenized.py)."""
    return {"files": [file_digest(f) for f in data_files(spec)], "validation_files": [file_digest(f) for f in data_files(spec, "validation_paths")]}


def cache_key(data: Mapping[str, Any], tokenizer: Mapping[str, Any], spec: TextDataSpec) -> str:
    settings = {k: v for k, v in spec.key().items() if k not in ("paths", "validation_paths", "dataset", "dataset_config", "revision")}
    blob = json.dumps({"v": ENCODING_VERSION, "data": data, "tokenizer": tokenizer, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached_entry(spec: TextDataSpec, tokenizer_folder: Path, cache_dir: Path) -> Path | None:
    """The cache folder the pre-step would write for local data and a local tokenizer, when it is
    there already (a dry run reads its counts); None otherwise, or when the key cannot be computed
    here (a hub dataset, missing files)."""
    if not spec.paths:
        return None
    try:
        key = cache_key(local_data_identity(spec), tokenizer_identity_of_files(tokenizer_folder), spec)
    except (OSError, ValueError):
        return None
    folder = cache_dir / key
    return folder if (folder / "meta.json").is_file() else None
