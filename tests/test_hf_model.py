"""Transformers causal LMs (trainer/hf_model.py, launcher/hf_config.py): the shipped tiny Llama
builds and trains a step, decoder layers found for FSDP, checkpointing through the model's own
switch, parameter counts without torch, packing isolation, rank-0 weight loading into a
meta-built model, and final/ as a from_pretrained folder. Single process, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import subprocess
import sys

import pytest
import torch

from trainer import hf_model
from trainer.collate import flatten_collate, pad_collate
from launcher.hf_config import num_parameters, read_config
from trainer.hf_model import SHIPPED_TINY, HFModelSpec, build_causal_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**kw) -> HFModelSpec:
    return HFModelSpec(config=str(SHIPPED_TINY / "config.json"), **kw)


def test_shipped_tiny_llama_builds_and_trains_a_step():
    model = build_causal_lm(tiny(), seed=0)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == num_parameters(read_config(SHIPPED_TINY))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    assert logits.shape == (2, 16, model.config.vocab_size)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # The same seed gives the same random weights (strategies' runs start from one model).
    again = build_causal_lm(tiny(), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_transformer_blocks_are_the_decoder_layers():
    model = build_causal_lm(tiny())
    blocks = hf_model.transformer_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    assert blocks == list(model.model.layers)


def test_gradient_checkpointing_same_gradients():
    ids = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = build_causal_lm(tiny(), seed=0)
        model.train()
        if checkpointing:
            hf_model.enable_gradient_checkpointing(model)
            assert getattr(model, 'is_activation_checkpointing', None) or model.is_gradient_checkpointing
        model(input_ids=ids).logits.float().square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_device_map_and_bad_dtype_refused():
    with pytest.raises(ValueError, match="model.device_map"):
        tiny(device_map="auto").check()
    with pytest.raises(ValueError, match="model.dtype"):
        tiny(dtype="float64").check()
    with pytest.raises(ValueError, match="exactly one"):
        HFModelSpec().check()


def test_num_parameters_without_torch_matches_transformers():
    import transformers as T

    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    configs = [
        T.LlamaConfig(**base),
        T.LlamaConfig(**base, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        T.MistralConfig(**base),
        T.Qwen2Config(**base),
        T.Qwen3Config(**base, head_dim=16),
        T.GemmaConfig(**base, head_dim=16),
        T.Gemma2Config(**base, head_dim=16),
        T.Gemma3TextConfig(**base, head_dim=16),
        T.Phi3Config(**base),
        T.Olmo2Config(**base),
        T.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1),
    ]
    for cfg in configs:
        with torch.device("meta"):
            model = T.AutoModelForCausalLM.from_config(cfg)
        assert num_parameters(cfg.to_dict()) == sum(p.numel() for p in model.parameters()), cfg.model_type
    assert num_parameters({"model_type": "mamba"}) is None
    # The module the launcher uses imports neither torch nor transformers.
    code = "import sys, launcher.hf_config; assert not {'torch', 'transformers'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_samples_do_not_attend_to_each_other(attn):
    """Logits of samples packed into one row equal each sample's logits run alone. The control:
    the same packed row WITH an attention mask of ones (which switches transformers' packed
    detection off) gives different logits, so this test fails if isolation breaks."""
    model = build_causal_lm(tiny(attn_implementation=attn), seed=0).eval()
    assert hf_model.packing_refusal(model) is None
    g = torch.Generator().manual_seed(2)
    samples = [(x, x) for x in (torch.randint(3, 4096, (n,), generator=g) for n in (7, 1, 12, 5))]
    with torch.no_grad():
        alone = [model(input_ids=x[None]).logits[0] for x, _ in samples]
        batch = flatten_collate(samples)
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(leaky, torch.cat(alone), rtol=1e-4, atol=1e-5)
    # A padded batch (attention mask, no position ids) gives the same logits on real tokens.
    padded = pad_collate(samples, pad_token_id=2)
    with torch.no_grad():
        out = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    for b, (x, _) in enumerate(samples):
        torch.testing.assert_close(out[b, : len(x)], alone[b], rtol=1e-4, atol=1e-5)


def test_packing_refused_for_other_attention():
    model = build_causal_lm(tiny(), seed=0)
    model.config._attn_implementation = "paged|sdpa"
    assert "cannot isolate" in hf_model.packing_refusal(model)


def test_final_folder_loads_with_from_pretrained_and_pipeline(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = build_causal_lm(tiny(), seed=3).eval()
    tok = AutoTokenizer.from_pretrained(SHIPPED_TINY)
    out = hf_model.save_pretrained_dir(tmp_path / "final", model.state_dict(), config=model.config, tokenizer=tok)
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names), names
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tok("def main(argv):\n    return 0\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    gen = pipeline("text-generation", model=str(out), device="cpu")
    text = gen("import os\n", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("import os\n") and len(text) > len("import os\n")


def test_meta_build_then_rank0_load_equals_from_pretrained(tmp_path):
    """The fsdp path in one process: meta-device build, materialise, load the safetensors."""
    src = build_causal_lm(tiny(), seed=4).eval()
    folder = hf_model.save_pretrained_dir(tmp_path / "src", src.state_dict(), config=src.config)
    spec = HFModelSpec(name_or_path=str(folder))
    assert hf_model.load_plan("fsdp", pretrained=True).init == "meta"
    model = build_causal_lm(spec, init="meta")
    assert all(p.is_meta for p in model.parameters())
    hf_model.materialize(model, torch.device("cpu"))
    hf_model.load_full_state_dict(model, str(folder))
    model.eval()
    ids = torch.randint(0, 4096, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, src(input_ids=ids).logits, rtol=0, atol=0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fsdp_meta_build_rank0_broadcast_two_ranks(tmp_path):
    """2 gloo ranks: meta build, FSDP2 per decoder layer, rank 0 streams the weights; each rank
    holds half the parameters and the logits equal the unsharded model's."""
    src = build_causal_lm(tiny(), seed=6).eval()
    folder = hf_model.save_pretrained_dir(tmp_path / "src", src.state_dict(), config=src.config)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    script = os.path.join(ROOT, "tests", "assets", "hf_fsdp_load.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, str(folder), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    with torch.no_grad():
        logits = src(input_ids=torch.arange(3, 40).reshape(1, -1)).logits
    total = sum(p.numel() for p in src.parameters())
    for r in ranks:
        assert r["logits_sum"] == pytest.approx(float(logits.double().sum()), rel=1e-6)
        torch.testing.assert_close(torch.tensor(r["logits_first"]), logits[0, :3, :5], rtol=1e-5, atol=1e-6)
        assert r["local_params"] <= total // 2 + 1000
    assert sum(r["local_params"] for r in ranks) == total


def test_launcher_side_checks_without_torch(tmp_path):
    """What validate.py can check before any process: a chat template present, a file's fields."""
    from launcher.hf_config import has_chat_template, record_fields

    assert has_chat_template(SHIPPED_TINY) is True
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    assert has_chat_template(tmp_path / "tok") is False
    assert has_chat_template("Qwen/Qwen2.5-0.5B") is None
    (tmp_path / "a.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (tmp_path / "b.csv").write_text("text,label\nhello,1\n")
    (tmp_path / "c.json").write_text('[{"messages": []}]')
    assert record_fields(tmp_path / "a.jsonl") == ["instruction", "output"]
    assert record_fields(tmp_path / "b.csv") == ["text", "label"]
    assert record_fields(tmp_path / "c.json") == ["messages"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "d.parquet")
    assert record_fields(tmp_path / "d.parquet") == ["text"]
