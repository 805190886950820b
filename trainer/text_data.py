"""Text, instruction and chat data for transformers models: load records with `datasets`, split
them, and turn each into input_ids with ALIGNED labels (trainer/model_io.py's contract:
labels[i] is the target of position i; -100 where no loss is taken).

Three formats:
  text               one field of plain text: bos + text + eos, every next token is a target
  prompt_completion  a prompt (Alpaca's instruction + input through a template, or any field)
                     and a completion: only the completion and its eos are targets
  messages           chat turns [{role, content}] rendered by the tokenizer's chat template (or
                     data.chat_template): only the assistant turns are targets
`train_on_prompt` makes every token a target in the last two. Samples longer than `max_length`
are cut to it. Errors are one line naming the data key to set (ValueError; the launcher's checks
call the same functions before any process starts).

This module imports `datasets` and `transformers` lazily; its settings type (TextDataSpec) lives in
launcher/hf_config.py, so the launcher can build one and hash it without either.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

# The settings type and file listing are plain Python in the base layer: the launcher builds,
# checks and hashes them without this module.
from launcher.hf_config import FORMATS, LOADERS, TextDataSpec, data_files  # noqa: F401  (re-exported)

IGNORE_INDEX = -100

# Alpaca's own templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT): with and without input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{prompt}\n\n### Input:\n{input}\n\n### Response:\n"
)

# ---------------------------------------------------------------- files and records


def load_splits(spec: TextDataSpec, *, cache_dir: str | None = None) -> dict[str, Any]:
    """{"train": Dataset, "validation": Dataset} of records. A validation split of the dataset
    wins; else the last `validation_fraction` of a seeded permutation is held out (the same on
    every machine: numpy's PCG64 with spec.seed)."""
    import datasets
    import numpy as np

    spec.check()
    if spec.paths:
        files = data_files(spec)
        loader = LOADERS[files[0].suffix.lower()]
        load = lambda split: datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)  # noqa: E731
        if spec.validation_split:
            raise ValueError("data.validation_split: local files have one split; set data.validation_paths or data.validation_fraction instead")
        if spec.validation_paths:
            val_files = data_files(spec, "validation_paths")
            load_val = datasets.load_dataset(LOADERS[val_files[0].suffix.lower()], data_files=[str(f) for f in val_files], split="train", cache_dir=cache_dir)
            return {"train": load(spec.split), "validation": load_val}
    else:
        kw: dict[str, Any] = {"revision": spec.revision or None, "cache_dir": cache_dir}
        load = lambda split: datasets.load_dataset(spec.dataset, spec.dataset_config or None, split=split, **kw)  # noqa: E731
    train = load(spec.split)
    if spec.validation_split:
        return {"train": train, "validation": load(spec.validation_split)}
    n = len(train)
    n_val = int(n * spec.validation_fraction)
    order = np.random.default_rng(spec.seed).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return {"train": train.select(train_idx), "validation": train.select(val_idx)}


def require_columns(columns: Sequence[str], spec: TextDataSpec, where: str) -> None:
    """One line naming the data key whose field the records lack."""
    need = {"text": [("text_field", spec.text_field)], "messages": [("messages_field", spec.messages_field)]}.get(spec.format)
    if need is None:
        need = [("prompt_field", spec.prompt_field), ("completion_field", spec.completion_field)]
        if spec.input_field:
            need.append(("input_field", spec.input_field))
    for key, name in need:
        if name not in columns:
            extra = " (or data.input_field='' when there is none)" if key == "input_field" else ""
            raise ValueError(f"data.{key}: {where} has no field {name!r} (its fields: {', '.join(columns)}); set data.{key}{extra}")


# ---------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str, *, revision: str = "", trust_remote_code: bool = False):
    """The fast tokenizer of a local folder or a hub id; a missing pad token becomes eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision or None, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def chat_template_of(tokenizer, spec: TextDataSpec) -> str:
    template = spec.chat_template or getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default", "")
    if not template:
        raise ValueError(
            f"data.chat_template: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template and data.format=messages needs one; "
            "set data.chat_template (Jinja) or use data.format=prompt_completion"
        )
    return template


# ---------------------------------------------------------------- labels


def aligned_labels(input_ids: Sequence[int], target: Sequence[int] | Sequence[bool]) -> list[int]:
    """labels[i] = input_ids[i + 1] when token i + 1 is a target, else -100; the last is -100."""
    n = len(input_ids)
    return [input_ids[i + 1] if target[i + 1] else IGNORE_INDEX for i in range(n - 1)] + ([IGNORE_INDEX] if n else [])


# Only the ids: the attention mask and type ids a tokenizer call also returns cost as much
# Python-side conversion as the ids themselves.
LEAN = {"return_attention_mask": False, "return_token_type_ids": False}


def ids_of(tokenizer, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """The token ids of a batch of texts, as `tokenizer(texts, add_special_tokens=...)["input_ids"]`.
    A fast tokenizer whose call goes straight to its Rust backend (transformers' TokenizersBackend,
    not overridden) is asked through `encode_batch_fast`: the same Rust encoding without character
    offsets and without BatchEncoding's per-sample Python conversion, which made ringleader's
    tokenization cost more CPU than a plain `datasets.map` over the same texts. The tokenizer's own
    call runs first on the batch's first text (it also resets the backend's truncation and padding
    state) and must give the same ids; any other tokenizer takes its own call for every text."""
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or not _plain_backend_call(tokenizer):
        return tokenizer(texts, add_special_tokens=add_special_tokens, **LEAN)["input_ids"]
    probe = tokenizer(texts[:1], add_special_tokens=add_special_tokens, **LEAN)["input_ids"]
    out = [e.ids for e in fast(texts, add_special_tokens=add_special_tokens)]
    if out[0] != probe[0]:
        return tokenizer(texts, add_special_tokens=add_special_tokens, **LEAN)["input_ids"]
    return out


def _plain_backend_call(tokenizer) -> bool:
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # another transformers layout: the tokenizer's own call
        return False
    return isinstance(tokenizer, TokenizersBackend) and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus


def prompt_text(record: dict[str, Any], spec: TextDataSpec) -> str:
    return _prompt(record[spec.prompt_field], record.get(spec.input_field) if spec.input_field else "", spec)


def _prompt(prompt: Any, extra: Any, spec: TextDataSpec) -> str:
    prompt, extra = str(prompt or ""), str(extra or "")
    if spec.prompt_template == "alpaca":
        return (ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT).format(prompt=prompt, input=extra)
    return spec.prompt_template.format(prompt=prompt, input=extra)


def _finish(ids: list[int], target: list[int], spec: TextDataSpec) -> tuple[list[int], list[int]]:
    ids, target = ids[: spec.max_length + 1], target[: spec.max_length + 1]
    # Labels on max_length + 1 tokens, then cut to max_length: a truncated sample still learns
    # its last position's next token.
    labels = aligned_labels(ids, target)
    return ids[: spec.max_length], labels[: spec.max_length]


def _finish_from(ids: list[int], first: int, spec: TextDataSpec) -> tuple[list[int], list[int]]:
    """_finish for targets that are one run, ids[first:] (text, prompt/completion), by slicing:
    no per-token Python loop (tokenization time is dominated by it otherwise)."""
    first = max(first, 1)  # position 0 is never a target
    ids = ids[: spec.max_length + 1]
    labels = [IGNORE_INDEX] * (first - 1) + ids[first:] + [IGNORE_INDEX]
    return ids[: spec.max_length], labels[: spec.max_length]


def encode_batch(batch: dict[str, list], *, tokenizer, spec: TextDataSpec, chat_template: str = "") -> dict[str, list]:
    """datasets.map(batched=True) function: records -> {"input_ids", "labels"} (lists of ints).
    Text and prompts go through the fast tokenizer's batch call (Rust, its own threads)."""
    eos = [tokenizer.eos_token_id] if spec.add_eos and tokenizer.eos_token_id is not None else []
    out_ids: list[list[int]] = []
    out_labels: list[list[int]] = []
    if spec.format == "text":
        enc = ids_of(tokenizer, [str(t or "") for t in batch[spec.text_field]], add_special_tokens=True)
        for ids in enc:
            ids, labels = _finish_from(ids + eos, 0, spec)
            out_ids.append(ids)
            out_labels.append(labels)
    elif spec.format == "prompt_completion":
        n = len(batch[spec.prompt_field])
        inputs = batch[spec.input_field] if spec.input_field else [""] * n
        texts = [_prompt(p, x, spec) for p, x in zip(batch[spec.prompt_field], inputs)]
        prompts = ids_of(tokenizer, texts, add_special_tokens=True)
        completions = ids_of(tokenizer, [str(c or "") for c in batch[spec.completion_field]], add_special_tokens=False)
        for p, c in zip(prompts, completions):
            # Prompt and completion are encoded apart and joined: the model trains on exactly the
            # tokens it sees at inference, where the prompt is encoded alone.
            ids, labels = _finish_from(p + c + eos, 0 if spec.train_on_prompt else len(p), spec)
            out_ids.append(ids)
            out_labels.append(labels)
    else:
        for messages in batch[spec.messages_field]:
            ids, target = encode_messages(messages, tokenizer=tokenizer, chat_template=chat_template, train_on_prompt=spec.train_on_prompt)
            ids, labels = _finish(ids, target, spec)
            out_ids.append(ids)
            out_labels.append(labels)
    return {"input_ids": out_ids, "labels": out_labels}


def encode_messages(messages: list[dict[str, Any]], *, tokenizer, chat_template: str, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """A conversation's token ids and its target flags (1 on assistant tokens). A template with
    {% generation %} blocks marks them itself (transformers' return_assistant_tokens_mask);
    otherwise each assistant turn's characters are found by rendering the conversation up to it
    (with and without that turn), which holds for any template that renders earlier turns the
    same whatever follows them."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if "{% generation %}" in chat_template or "{%- generation %}" in chat_template:
        enc = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        target = [1] * len(ids) if train_on_prompt else list(enc["assistant_masks"])
        return ids, target
    render: Callable[..., str] = lambda ms, gen: tokenizer.apply_chat_template(ms, chat_template=chat_template, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ValueError("data.chat_template: the template renders earlier turns differently once later ones follow, so assistant tokens cannot be found; add {% generation %} blocks to it (set data.chat_template)")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        return ids, [1] * len(ids)
    target = [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]
    return ids, target


def tokenize_splits(splits: dict[str, Any], *, tokenizer, spec: TextDataSpec, num_proc: int = 1) -> dict[str, Any]:
    """Each split's records mapped to input_ids + labels (other columns dropped)."""
    template = chat_template_of(tokenizer, spec) if spec.format == "messages" else ""
    out = {}
    for name, ds in splits.items():
        require_columns(ds.column_names, spec, f"the {name} data")
        out[name] = ds.map(
            encode_batch,
            batched=True,
            batch_size=1000,
            num_proc=num_proc if num_proc > 1 and len(ds) >= 2 * num_proc else None,
            remove_columns=ds.column_names,
            fn_kwargs={"tokenizer": tokenizer, "spec": spec, "chat_template": template},
            load_from_cache_file=False,  # ringleader's own cache (trainer/tokenized.py) is keyed by content
            desc=f"tokenizing {name}",
        )
    return out


def settings_digest(spec: TextDataSpec) -> str:
    return hashlib.sha256(json.dumps(spec.key(), sort_keys=True).encode()).hexdigest()
