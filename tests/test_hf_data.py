"""Instruction, chat and text data for transformers models (trainer/text_data.py,
trainer/tokenized.py, trainer/collate.py, trainer/stdlib_instruct.py, trainer/assets): labels
checked token by token, collators as pure tensor functions, the content-keyed cache. Offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer import stdlib_instruct, text_data, tokenized
from trainer.collate import IGNORE_INDEX, PackedDataset, flatten_collate, pack_bins, pad_collate
from trainer.hf_model import SHIPPED_TINY
from trainer.text_data import TextDataSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return text_data.load_tokenizer(str(SHIPPED_TINY))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- shipped tokenizer


def test_shipped_tokenizer_loads_and_round_trips(tok):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(SHIPPED_TINY)
    text = "def dumps(obj, *, indent=None):\n    \"\"\"Serialize ``obj`` to JSON — ünïcode 🐍\"\"\"\n"
    ids = auto(text)["input_ids"]
    assert ids[0] == auto.bos_token_id
    assert auto.decode(ids, skip_special_tokens=True) == text
    assert len(auto) == json.loads((SHIPPED_TINY / "config.json").read_text())["vocab_size"]
    import inspect

    source = inspect.getsource(json)
    assert len(source.encode()) / len(auto(source)["input_ids"]) > 2.5  # trained on Python: ~3 bytes a token
    for t in ("<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"):
        assert len(auto(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert sum(f.stat().st_size for f in SHIPPED_TINY.iterdir()) < 1_000_000


def test_make_tokenizer_is_deterministic(tmp_path):
    """Two runs of the script give the same file; on the Python that made the shipped one, that file."""
    for out in ("a", "b"):
        subprocess.run([sys.executable, "-m", "trainer.assets.make_tokenizer", str(tmp_path / out)], check=True, cwd=ROOT, timeout=120)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    made_with = json.loads((SHIPPED_TINY / "tokenizer_config.json").read_text())["ringleader_made_with"]
    if made_with.endswith(sys.version.split()[0]):
        assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (SHIPPED_TINY / "tokenizer.json").read_bytes()


# ---------------------------------------------------------------- labels, token by token


def decoded_targets(tok, ids, labels) -> str:
    """The text of the labelled targets, checking each label is the next input token."""
    out = []
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            assert i + 1 < len(ids) and ids[i + 1] == lab, (i, lab)
            out.append(lab)
    return tok.decode(out)


def test_prompt_completion_labels(tok):
    spec = TextDataSpec(paths=["x.jsonl"], format="prompt_completion", max_length=512)
    batch = {"instruction": ["Add two numbers.", "Say hi."], "input": ["2 and 3", ""], "output": ["5", "hi"]}
    enc = text_data.encode_batch(batch, tokenizer=tok, spec=spec)
    for i, (ids, labels) in enumerate(zip(enc["input_ids"], enc["labels"])):
        assert len(ids) == len(labels)
        prompt = text_data.prompt_text({k: v[i] for k, v in batch.items()}, spec)
        p = tok(prompt)["input_ids"]
        c = tok(batch["output"][i], add_special_tokens=False)["input_ids"]
        assert ids == p + c + [tok.eos_token_id]
        # Token by token: nothing before the last prompt token, then each completion token and eos.
        assert labels == [IGNORE_INDEX] * (len(p) - 1) + c + [tok.eos_token_id] + [IGNORE_INDEX]
        assert decoded_targets(tok, ids, labels) == batch["output"][i] + "</s>"
    assert "### Input:\n2 and 3" in text_data.prompt_text({"instruction": "a", "input": "2 and 3"}, spec)
    on = text_data.encode_batch(batch, tokenizer=tok, spec=TextDataSpec(paths=["x"], format="prompt_completion", train_on_prompt=True))
    assert on["labels"][0] == on["input_ids"][0][1:] + [IGNORE_INDEX]


def test_text_labels_and_truncation(tok):
    spec = TextDataSpec(paths=["x"], format="text", max_length=6)
    enc = text_data.encode_batch({"text": ["import os\nimport sys\nprint(os.sep, sys.argv)\n"]}, tokenizer=tok, spec=spec)
    full = tok("import os\nimport sys\nprint(os.sep, sys.argv)\n")["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"][0] == full[:6]
    assert enc["labels"][0] == full[1:7]  # the last position keeps its target after the cut


CONVERSATION = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
    {"role": "user", "content": "And json.loads?"},
    {"role": "assistant", "content": "Deserialize s to a Python object."},
]


def test_chat_labels_with_generation_blocks(tok):
    template = text_data.chat_template_of(tok, TextDataSpec(paths=["x"], format="messages"))
    assert "{% generation %}" in template
    ids, target = text_data.encode_messages(CONVERSATION, tokenizer=tok, chat_template=template)
    spec = TextDataSpec(paths=["x"], format="messages", max_length=4096)
    enc = text_data.encode_batch({"messages": [CONVERSATION]}, tokenizer=tok, spec=spec, chat_template=template)
    assert enc["input_ids"][0] == ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    # Only the assistant turns and their eos are targets, token by token.
    labels = enc["labels"][0]
    trained = [tok.decode([ids[i + 1]]) for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    a1 = [tok.decode([t]) for t in tok(CONVERSATION[2]["content"] + "</s>", add_special_tokens=False)["input_ids"]]
    a2 = [tok.decode([t]) for t in tok(CONVERSATION[4]["content"] + "</s>", add_special_tokens=False)["input_ids"]]
    assert trained == a1 + a2
    assert decoded_targets(tok, ids, labels) == CONVERSATION[2]["content"] + "</s>" + CONVERSATION[4]["content"] + "</s>"


def test_chat_labels_without_generation_blocks(tok):
    """A template without {% generation %}: assistant turns found by rendering prefixes; the
    labels equal those of the same layout with generation blocks."""
    plain = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids_a, target_a = text_data.encode_messages(CONVERSATION, tokenizer=tok, chat_template=tok.chat_template)
    ids_b, target_b = text_data.encode_messages(CONVERSATION, tokenizer=tok, chat_template=plain)
    assert ids_a == ids_b
    # The prefix method also marks the "\n" after each eos (it belongs to the assistant's turn in
    # the render); nothing else differs.
    extra = [i for i, (a, b) in enumerate(zip(target_a, target_b)) if a != b]
    assert all(target_b[i] and tok.decode([ids_b[i]]) == "\n" and ids_b[i - 1] == tok.eos_token_id for i in extra)


def test_errors_name_the_key(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 4)
    with pytest.raises(ValueError, match=r"^data.prompt_field: the train data has no field 'instruction' \(its fields: question, answer\); set data.prompt_field$"):
        tokenized.prepare(TextDataSpec(paths=[str(path)], format="prompt_completion", validation_fraction=0), tokenizer=tok, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="data.text_field"):
        tokenized.prepare(TextDataSpec(paths=[str(path)], format="text"), tokenizer=tok, cache_dir=tmp_path / "c")
    no_template = text_data.load_tokenizer(str(SHIPPED_TINY))
    no_template.chat_template = None
    with pytest.raises(ValueError, match=r"^data.chat_template: .* set data.chat_template"):
        tokenized.prepare(TextDataSpec(paths=[str(path)], format="messages"), tokenizer=no_template, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="data.paths"):
        TextDataSpec(paths=[str(tmp_path / "none*.jsonl")]).check() or text_data.data_files(TextDataSpec(paths=[str(tmp_path / "none*.jsonl")]))
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- collators


def sample(n: int, start: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return ids, torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])


def test_pad_collate():
    b = pad_collate([sample(3), sample(5, 20)], pad_token_id=2)
    assert b["input_ids"].tolist() == [[10, 11, 12, 2, 2], [20, 21, 22, 23, 24]]
    assert b["labels"].tolist() == [[11, 12, -100, -100, -100], [21, 22, 23, 24, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert "position_ids" not in b
    assert pad_collate([sample(3)], pad_to_multiple_of=4)["input_ids"].shape == (1, 4)


def test_flatten_and_pack_restart_positions():
    f = flatten_collate([sample(3), sample(2, 20)])
    assert f["input_ids"].tolist() == [[10, 11, 12, 20, 21]]
    assert f["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert f["labels"].tolist() == [[11, 12, -100, 21, -100]]  # no label crosses into the next sample
    assert "attention_mask" not in f
    lengths = [5, 3, 8, 2, 6, 1, 7]
    bins = pack_bins(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 32 tokens in 4 rows of 8: no waste on this input
    ds = PackedDataset([sample(n, 10 * k) for k, n in enumerate(lengths)], lengths, 8)
    batch = pad_collate([ds[i] for i in range(len(ds))], pad_token_id=2)
    assert "attention_mask" not in batch  # a mask would turn transformers' packed detection off
    for row, b in zip(batch["position_ids"].tolist(), ds.bins):
        expect = [p for i in b for p in range(lengths[i])]
        assert row[: len(expect)] == expect and row[len(expect) :] == list(range(8 - len(expect)))
    with pytest.raises(ValueError, match="max_length"):
        pack_bins([9], 8)


# ---------------------------------------------------------------- cache


def test_cache_hit_reuses_and_settings_invalidate(tok, tmp_path, monkeypatch):
    rows = stdlib_instruct.records("train")[:120]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    calls = []
    real = text_data.encode_batch
    monkeypatch.setattr(text_data, "encode_batch", lambda batch, **kw: calls.append(len(next(iter(batch.values())))) or real(batch, **kw))
    spec = TextDataSpec(paths=[str(path)], format="prompt_completion", max_length=64, validation_fraction=0.1)
    first = tokenized.prepare(spec, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert not first.hit and sum(calls) == 120
    assert first.samples == {"train": 108, "validation": 12}
    train = tokenized.TokenizedDataset(first.folder, "train")
    assert first.packed_samples["train"] == len(pack_bins(train.lengths.tolist(), 64)) <= 108  # the plan's count with packing (Alpaca prompts fill most of 64 tokens)
    second = tokenized.prepare(spec, tokenizer=tok, cache_dir=tmp_path / "cache")
    assert second.hit and second.folder == first.folder and sum(calls) == 120  # nothing tokenized
    # A changed setting, a changed byte of data, a changed tokenizer: each a new entry.
    for changed, tk in ((TextDataSpec(**{**spec.key(), "max_length": 65}), tok), (TextDataSpec(**{**spec.key(), "train_on_prompt": True}), tok)):
        got = tokenized.prepare(changed, tokenizer=tk, cache_dir=tmp_path / "cache")
        assert not got.hit and got.folder != first.folder
    other = text_data.load_tokenizer(str(SHIPPED_TINY))
    other.chat_template = "{{ messages }}"
    assert tokenized.prepare(spec, tokenizer=other, cache_dir=tmp_path / "cache").folder != first.folder
    path.write_text(path.read_text().replace("Base64", "base64", 1))
    assert tokenized.prepare(spec, tokenizer=tok, cache_dir=tmp_path / "cache").folder != first.folder
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_cached_dataset_matches_direct_encoding(tok, tmp_path):
    rows = [stdlib_instruct.as_messages(r) for r in stdlib_instruct.records("validation")]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    spec = TextDataSpec(paths=[str(path)], format="messages", max_length=40, validation_fraction=0.0)
    got = tokenized.prepare(spec, tokenizer=tok, cache_dir=tmp_path / "cache")
    ds = tokenized.TokenizedDataset(got.folder, "train")
    assert len(ds) == len(rows) and got.samples["validation"] == 0
    assert isinstance(ds.tokens, __import__("numpy").memmap)
    enc = text_data.encode_batch({"messages": [r["messages"] for r in rows]}, tokenizer=tok, spec=spec, chat_template=tok.chat_template)
    for i in range(len(rows)):
        ids, labels = ds[i]
        assert ids.dtype == torch.int64 and ids.tolist() == enc["input_ids"][i] and labels.tolist() == enc["labels"][i]
        assert len(ids) <= 40
    import pickle

    copy = pickle.loads(pickle.dumps(ds))  # a spawned loader worker maps the files again
    assert copy[3][0].tolist() == ds[3][0].tolist()


def test_validation_fraction_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(200)])
    spec = TextDataSpec(paths=[str(path)], format="text", validation_fraction=0.1, seed=7)
    a, b = text_data.load_splits(spec), text_data.load_splits(spec)
    assert a["validation"]["text"] == b["validation"]["text"] and len(a["validation"]) == 20
    assert not set(a["train"]["text"]) & set(a["validation"]["text"])


# ---------------------------------------------------------------- the stdlib instruction set


def test_stdlib_instruct_deterministic_split(tmp_path):
    train, val = stdlib_instruct.records("train"), stdlib_instruct.records("validation")
    assert len(train) > 400 and 10 < len(val) < len(train) / 10
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in val}
    assert all(r["output"] and r["instruction"] and r["input"] == "" for r in train + val)
    written = stdlib_instruct.write_jsonl(tmp_path)
    again = subprocess.run([sys.executable, "-m", "trainer.stdlib_instruct", str(tmp_path / "again")], check=True, cwd=ROOT, capture_output=True, text=True)
    assert "train.messages" in again.stdout
    for name, path in written.items():
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), name
    msg = json.loads(written["train.messages"].read_text().splitlines()[0])["messages"]
    assert [m["role"] for m in msg] == ["user", "assistant"]
    code = "import sys, trainer.stdlib_instruct as s, trainer.tokenized, trainer.text_data; s.records(); assert not {'torch', 'transformers', 'datasets'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_stdlib_instruct_files_through_the_cache(tok, tmp_path):
    """The stdlib set's own split via validation_paths, in both formats."""
    files = stdlib_instruct.write_jsonl(tmp_path / "si")
    for fmt, kind in (("prompt_completion", "alpaca"), ("messages", "messages")):
        spec = TextDataSpec(paths=[str(files[f"train.{kind}"])], validation_paths=[str(files[f"validation.{kind}"])], format=fmt, max_length=128)
        got = tokenized.prepare(spec, tokenizer=tok, cache_dir=tmp_path / "cache")
        assert got.samples == {"train": len(stdlib_instruct.records("train")), "validation": len(stdlib_instruct.records("validation"))}
        if fmt == "messages":  # short chats: several to a 128-token row
            assert got.packed_samples["train"] < got.samples["train"] / 2
        ds = tokenized.TokenizedDataset(got.folder, "validation")
        ids, labels = ds[0]
        assert (labels != IGNORE_INDEX).sum() > 0 and (labels == IGNORE_INDEX).sum() > 0
