"""Rebuild the shipped byte-level BPE tokenizer of trainer/assets/llama_tiny from the standard library.

    python -m trainer.assets.make_tokenizer [OUT_DIR]

Deterministic: the same Python (its standard library is the corpus) gives the same tokenizer.json
byte for byte. The shipped one was made with the interpreter named in its tokenizer_config.json
("ringleader_made_with"). Torch-free; needs only the `tokenizers` library.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "llama_tiny"
VOCAB_SIZE = 4096
CORPUS_BYTES = 6_000_000  # ~6 MB of the standard library in launcher/corpus.py's fixed order: about 10 s to train

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, *CHAT_MARKERS]  # ids 0..6, in this order

# Every turn is "<|role|>\n" + content + an end marker + "\n". An assistant turn ends with the eos
# token instead, so a generation stops there; its content and that eos sit in a {% generation %}
# block, which is how transformers' return_assistant_tokens_mask (and ringleader's labels) find
# the tokens that get a loss.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['content'] + '<|end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def corpus_texts(limit: int = CORPUS_BYTES) -> list[str]:
    """The standard library's files in launcher/corpus.py's fixed order (the pystdlib dataset's order), up
    to `limit` bytes, one string per file."""
    from launcher.corpus import pystdlib_order

    texts, total = [], 0
    for path, size in pystdlib_order():
        if total >= limit:
            break
        with open(path, "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
        total += size
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level: every byte string encodes, no unknown token; no prefix space, so the encoding of
    # a prompt followed by a completion is the two encodings side by side.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = tok.token_to_id(BOS)
    # Like Llama: encoding with special tokens puts <s> first; a chat template writes its own.
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)])
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": CHAT_MARKERS,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "ringleader_made_with": f"python -m trainer.assets.make_tokenizer on Python {sys.version.split()[0]}",
    }


def model_config(vocab_size: int) -> dict:
    """A ~1 M-parameter Llama: trains in minutes on two CPU cores."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
        "torch_dtype": "float32",
    }


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus_texts())
    files = {
        "tokenizer.json": tok.to_str(pretty=False) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": CHAT_MARKERS}, indent=2) + "\n",
        "config.json": json.dumps(model_config(tok.get_vocab_size()), indent=2) + "\n",
        "generation_config.json": json.dumps({"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}, indent=2) + "\n",
    }
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
