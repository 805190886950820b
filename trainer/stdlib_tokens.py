"""Pretraining text for a transformers model, offline: the Python standard library's own source
(data=pystdlib's files and split) in tokens of the model's tokenizer, as windows of seq_len tokens.
The dataset behind `data=pystdlib_tokens` (a user-style `data._target_`), which pretrains the shipped
tiny Llama for the fine-tuning demo (conf/demo/). data=pystdlib itself stays byte-level.

Each rank tokenizes its split itself (the fast tokenizer does a few MB in seconds, well inside the
collective timeouts); every rank gets the same tokens, so the sampler's order is the same as for
any map-style dataset.
"""

from __future__ import annotations

import numpy as np

from launcher import corpus
from launcher.schema import DataConfig
from trainer.data import TokenWindows

CHUNK = 1 << 16  # characters per tokenizer call: the fast tokenizer's batch call parallelises them


def stdlib_tokens(*, split: str, seq_len: int, tokenizer: str = "pkg:trainer/assets/llama_tiny", max_bytes: int = 3_000_000, validation_fraction: float = 0.05) -> TokenWindows:
    """Windows of seq_len tokens (labels: the next tokens) over the split's source files, read as
    data=pystdlib reads them (the same files, order and byte cap), tokenized in 64 KiB pieces."""
    from launcher.hf_config import package_path
    from trainer.text_data import load_tokenizer

    tok = load_tokenizer(package_path(tokenizer))
    tok.model_max_length = 1 << 62  # whole 64 KiB pieces, cut into windows below: not the model's inputs
    files = corpus.split_of(DataConfig(name="pystdlib", max_bytes=max_bytes, validation_fraction=validation_fraction), split)
    text = corpus.read_split(files).decode("utf-8", errors="replace")
    chunks = [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]
    ids: list[int] = []
    for enc in tok(chunks, add_special_tokens=False, return_attention_mask=False)["input_ids"]:
        ids.extend(enc)
    return TokenWindows(np.asarray(ids, dtype=np.int64), seq_len)
