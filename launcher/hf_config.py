"""A transformers model's parameter count from its config.json alone, without torch or
transformers: the launcher's plan sizes memory before any rank starts.

Covers the common decoder-only families (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text,
phi3, gpt2); any other model_type returns None and the plan asks for `model.num_parameters`.
Checked against the models transformers builds from the same configs (tests/test_hf_model.py).
"""

from __future__ import annotations

import json
import os
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
