"""Completions of fixed prompts at each evaluation (train.eval_prompts, train.eval_max_new_tokens):
greedy, computed on every rank together, logged by rank 0 (metrics.jsonl's "generations" event,
TensorBoard text). Transformers models only (the launcher refuses the prompts for others).

Why every rank takes part: under ZeRO-3 and FSDP2 a forward gathers each layer's parameters from
all ranks, so a rank that stopped at its end-of-sequence token while another went on would leave
that one waiting in a collective for ever (DeepSpeed #5394, transformers #20130). Every rank runs
the same prompts, one at a time, through transformers' `generate(..., synced_gpus=True)`: each new
token ends with a one-number all-reduce of "finished?", and a rank that is done keeps running
forwards until every rank is. Under DDP the unwrapped module generates (DDP's own forward would
broadcast buffers at each call). transformers turns synced_gpus on by itself only for ZeRO-3 and
for FSDP2 applied through its own integration, not for ringleader's fully_shard: it is passed here
whenever the world is larger than one.

How a prompt is written, by data.format, as training wrote its prompts (trainer/text_data.py):
  messages           one user turn through the chat template (data.chat_template, else the
                     tokenizer's) with the generation prompt (add_generation_prompt=True), so the
                     model continues as the assistant it was trained to be
  prompt_completion  data.prompt_template (Alpaca's without input by default), special tokens as
                     in training
  text               the prompt as given, with the tokenizer's special tokens (bos)
The completion is the new tokens up to the first eos, decoded without special tokens.

The training stream is untouched: the model evaluates (no dropout) under no_grad and goes back to
train mode; greedy decoding draws no random numbers, and generation runs inside
torch.random.fork_rng all the same, so a run with prompts computes the same steps as one without,
and a resumed run stays bit-identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from launcher.schema import RunConfig

log = logging.getLogger("ringleader")

# Alpaca's prompt without input (tatsu-lab/stanford_alpaca), as trainer/text_data.py trains on it.
ALPACA = "alpaca"


@dataclass(frozen=True, kw_only=True)
class PromptFormat:
    """How a prompt becomes tokens: the data group's format and templates."""

    format: str = "text"  # text | prompt_completion | messages
    prompt_template: str = ALPACA
    chat_template: str = ""  # "": the tokenizer's own

    @classmethod
    def of(cls, cfg: RunConfig) -> PromptFormat:
        d = cfg.data
        return cls(format=d.format if d.is_text else "text", prompt_template=d.prompt_template, chat_template=d.chat_template)


def encode_prompt(tokenizer: Any, prompt: str, fmt: PromptFormat) -> list[int]:
    """The prompt's token ids, written as training wrote its prompts (see the module docstring)."""
    from trainer.text_data import ALPACA_PROMPT

    if fmt.format == "messages":
        template = fmt.chat_template or None
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=template, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if fmt.format == "prompt_completion":
        text = ALPACA_PROMPT.format(prompt=prompt) if fmt.prompt_template == ALPACA else fmt.prompt_template.format(prompt=prompt, input="")
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def greedy_config(tokenizer: Any, max_new_tokens: int) -> Any:
    """Greedy decoding of at most max_new_tokens, stopping at the tokenizer's eos; with the KV
    cache (training builds the model with use_cache off)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, use_cache=True)


def complete(model: Any, tokenizer: Any, ids: list[int], *, config: Any, synced: bool = False, device: torch.device | str = "cpu") -> str:
    """One prompt's greedy completion (up to the first eos), decoded."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config, synced_gpus=synced)
    new = out[0, len(ids):].tolist()
    if config.eos_token_id in new:
        new = new[: new.index(config.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def unwrap(model: Any) -> Any:
    """The module that generates: DDP's and DeepSpeed's engine's `.module`; an FSDP2 model is its own."""
    return getattr(model, "module", model)


class Generations:
    """The prompts of one run, completed by every rank together at each evaluation."""

    def __init__(self, *, prompts: list[str], max_new_tokens: int, tokenizer_source: str, revision: str = "", trust_remote_code: bool = False, fmt: PromptFormat, device: torch.device) -> None:
        self.prompts, self.max_new_tokens, self.fmt, self.device = list(prompts), max_new_tokens, fmt, device
        self.tokenizer_source, self.revision, self.trust_remote_code = tokenizer_source, revision, trust_remote_code
        self.tokenizer: Any = None
        self.encoded: list[list[int]] = []

    @classmethod
    def from_config(cls, cfg: RunConfig, *, device: torch.device) -> Generations | None:
        t, m = cfg.train, cfg.model
        if not t.eval_prompts:
            return None
        from launcher.hf_config import package_path

        return cls(
            prompts=list(t.eval_prompts), max_new_tokens=t.eval_max_new_tokens, tokenizer_source=package_path(m.tokenizer_source), revision=m.revision,
            trust_remote_code=m.trust_remote_code, fmt=PromptFormat.of(cfg), device=device,
        )

    def load(self) -> None:
        """The tokenizer and the encoded prompts, once (at the first evaluation)."""
        if self.tokenizer is None:
            from trainer.text_data import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_source, revision=self.revision, trust_remote_code=self.trust_remote_code)
            self.encoded = [encode_prompt(self.tokenizer, p, self.fmt) for p in self.prompts]

    def __call__(self, strategy: Any) -> list[dict[str, str]]:
        """Every rank calls it with the same prompts (collective under sharding); every rank gets
        the completions, rank 0 logs them. The strategy is left in train mode."""
        self.load()
        model = unwrap(strategy.model)
        config = greedy_config(self.tokenizer, self.max_new_tokens)
        synced = dist.is_initialized() and dist.get_world_size() > 1
        devices = [self.device] if self.device.type == "cuda" else []
        strategy.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad(), strategy.autocast():
                completions = [complete(model, self.tokenizer, ids, config=config, synced=synced, device=self.device) for ids in self.encoded]
        finally:
            strategy.train()
        return [{"prompt": p, "completion": c} for p, c in zip(self.prompts, completions)]


def as_markdown(generations: list[dict[str, str]]) -> str:
    """TensorBoard's text view of one evaluation's generations (it renders markdown)."""
    return "\n\n".join(f"**prompt:** {g['prompt']}\n\n**completion:** {g['completion']}\n\n---" for g in generations)
