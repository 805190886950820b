"""The plan's memory estimate per rank: model states (parameters, gradients, optimizer states) under
the chosen strategy and world size, activations with and without gradient checkpointing, and
whether it fits a hw profile's GPU. Pure and torch-free: the launcher counts parameters by formula.

Bytes per parameter per rank, Ψ parameters over N ranks, Adam (two fp32 moments, 8 bytes):

  mixed precision (bf16/fp16), the ZeRO paper's accounting (its K = 12: fp32 master + moments)
    ddp    params 4 (fp32, autocast)    grads 4      optimizer 8        = 16
    zero1  params 2 (16-bit)            grads 2      optimizer 12/N     = 4 + 12/N
    zero2  params 2                     grads 2/N    optimizer 12/N     = 2 + 14/N
    zero3  params 2/N                   grads 2/N    optimizer 12/N     = 16/N
    fsdp   params 4/N (fp32 shards)     grads 4/N    optimizer 8/N      = 16/N   (+ one gathered
           16-bit block at a time, counted with activations)
  fp32 (the CPU default): DeepSpeed still keeps an fp32 copy of its partition (4/N), so
    ddp 4 + 4 + 8 = 16;  zero1 4 + 4 + 12/N;  zero2 4 + 4/N + 12/N;  zero3 4/N + 4/N + 12/N;
    fsdp 4/N + 4/N + 8/N.
  zero3_offload: optimizer states and the fp32 master live in CPU memory; the GPU holds the
    16-bit parameter shard and a gradient shard in transit (counted as 2/N each).

SGD keeps 4 bytes of momentum (0 without), 8-bit Adam 2 bytes, in place of Adam's 8. DeepSpeed's
bucket buffers and the CUDA context are not model states; the fit check keeps 10% and 1 GB back.
"""

from __future__ import annotations

from dataclasses import dataclass

from launcher.schema import RunConfig

GB = 1e9


def gpt_parameters(*, vocab_size: int, block_size: int, n_layer: int, n_embd: int, bias: bool, **_: object) -> int:
    """Exact parameter count of trainer.model.GPT (tied lm_head), checked against numel in tests."""
    d, b = n_embd, int(bias)
    per_block = 12 * d * d + 2 * d + 11 * b * d  # qkv, proj, two MLP matrices; two LayerNorms; biases
    return vocab_size * d + block_size * d + n_layer * per_block + d + b * d


def count_parameters(cfg: RunConfig) -> int:
    """Parameters of the configured model without building it (the launcher never imports torch
    or the model); for a user's model, model.num_parameters (0: unknown)."""
    m = cfg.model
    if m._target_ == "trainer.model.GPT":
        return gpt_parameters(**{k: getattr(m, k) for k in ("vocab_size", "block_size", "n_layer", "n_embd", "bias")})
    if m.is_transformers and not m.num_parameters:  # from config.json alone (local, or in the hub cache)
        from launcher.hf_config import num_parameters, read_config, source_folder

        folder = source_folder(m.name_or_path or m.config, revision=m.revision)
        config = read_config(folder) if folder is not None else None
        return (num_parameters(config) or 0) if config else 0
    return m.num_parameters


def optimizer_state_bytes(cfg: RunConfig) -> float:
    name = cfg.optimizer.name
    if name == "sgd":
        return 4.0 if cfg.optimizer.momentum else 0.0
    if name == "paged_adamw_8bit":
        return 2.0
    return 8.0


def model_state_bytes(strategy: str, *, world_size: int, mixed: bool, optimizer_bytes: float = 8.0) -> dict[str, float]:
    """Bytes per parameter on one rank: {"parameters", "gradients", "optimizer"}."""
    n, k = world_size, optimizer_bytes
    master = 4.0  # DeepSpeed's fp32 partition (the master copy under mixed precision)
    if strategy == "ddp":
        return {"parameters": 4.0, "gradients": 4.0, "optimizer": k}
    if strategy == "fsdp":
        return {"parameters": 4.0 / n, "gradients": 4.0 / n, "optimizer": k / n}
    p = 2.0 if mixed else 4.0
    if strategy == "zero1":
        return {"parameters": p, "gradients": p, "optimizer": (master + k) / n}
    if strategy == "zero2":
        return {"parameters": p, "gradients": p / n, "optimizer": (master + k) / n}
    if strategy == "zero3":
        return {"parameters": p / n, "gradients": p / n, "optimizer": (master + k) / n}
    if strategy == "zero3_offload":
        return {"parameters": p / n, "gradients": p / n, "optimizer": 0.0}
    raise ValueError(f"unknown strategy {strategy}")


def activation_bytes(cfg: RunConfig, *, micro_batch: int, checkpointing: bool) -> float:
    """Activations kept for backward by one micro-batch of the built-in GPT, after Korthikanti et
    al. (2022) without dropout masks and with fused (flash) attention: about 16 values of width
    n_embd per token and layer, the residual stream alone per layer when checkpointed (plus one
    block recomputed at a time), and the logits (16-bit, then fp32 for the loss, and its softmax)."""
    m = cfg.model
    e = 2.0 if (cfg.train.bf16 or cfg.train.fp16) else 4.0
    tokens = micro_batch * cfg.data.seq_len
    d = m.n_embd
    per_layer = 16 * tokens * d * e
    residual = tokens * d * 4.0
    logits = tokens * m.vocab_size * (e + 8.0)
    if checkpointing:
        return m.n_layer * residual + per_layer + logits
    return m.n_layer * per_layer + residual + logits


@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    parameters: int
    per_rank: dict[str, float]  # GB
    total_gb: float


def estimate(cfg: RunConfig, *, world_size: int, strategy: str | None = None, micro_batch: int | None = None, checkpointing: bool | None = None) -> MemoryEstimate | None:
    """Per-rank GB for this config (or a variant of it, for the suggestions). None: parameter
    count unknown."""
    psi = count_parameters(cfg)
    if psi <= 0:
        return None
    strategy = strategy or cfg.strategy.name
    micro_batch = micro_batch or cfg.train.per_device_train_batch_size
    checkpointing = cfg.train.gradient_checkpointing if checkpointing is None else checkpointing
    mixed = cfg.train.bf16 or cfg.train.fp16
    states = model_state_bytes(strategy, world_size=world_size, mixed=mixed, optimizer_bytes=optimizer_state_bytes(cfg))
    builtin = cfg.model._target_ == "trainer.model.GPT"
    per_rank = {name: psi * b / GB for name, b in states.items()}
    if builtin:
        act = activation_bytes(cfg, micro_batch=micro_batch, checkpointing=False) / GB
        act_ckpt = activation_bytes(cfg, micro_batch=micro_batch, checkpointing=True) / GB
        per_rank["activations"] = act_ckpt if checkpointing else act
        per_rank["activations_without_checkpointing" if checkpointing else "activations_if_checkpointed"] = act if checkpointing else act_ckpt
    total = sum(v for k, v in per_rank.items() if k in ("parameters", "gradients", "optimizer", "activations"))
    per_rank["total"] = total
    return MemoryEstimate(parameters=psi, per_rank=per_rank, total_gb=total)


def usable_gb(gpu_memory_gb: float) -> float:
    """What a training process can count on: 10% for the allocator's fragmentation, 1 GB for the
    CUDA context and communication buffers."""
    return 0.9 * gpu_memory_gb - 1.0


def plan_memory(cfg: RunConfig, *, world_size: int) -> tuple[dict[str, float], list[str]]:
    """The plan's `memory` (GB per rank, and num_parameters) and its warnings."""
    est = estimate(cfg, world_size=world_size)
    if est is None:  # said only where it matters: a GPU profile whose memory could be checked
        if cfg.hw.accelerator != "cuda" or cfg.hw.gpu_memory_gb <= 0:
            return {}, []
        return {}, [f"no memory estimate: the launcher cannot count the parameters of {cfg.model._target_} without importing it; set model.num_parameters=N to get one"]
    memory = {"num_parameters": float(est.parameters), **est.per_rank}
    warnings: list[str] = []
    hw = cfg.hw
    if hw.accelerator == "cuda" and hw.gpu_memory_gb > 0:
        budget = usable_gb(hw.gpu_memory_gb)
        if est.total_gb > budget:
            warnings.append(f"about {est.total_gb:.1f} GB per GPU does not fit the {hw.gpu_memory_gb:g} GB of {hw.name} (about {budget:.1f} GB usable); " + suggest(cfg, world_size=world_size, budget=budget))
    return memory, warnings


def suggest(cfg: RunConfig, *, world_size: int, budget: float) -> str:
    """The nearest change that fits: more sharding first (same math, same batch), then gradient
    checkpointing, then a smaller micro-batch with more accumulation (same effective batch)."""
    t = cfg.train
    order = ["ddp", "zero1", "zero2", "fsdp", "zero3", "zero3_offload"]
    start = order.index(cfg.strategy.name) if cfg.strategy.name in order else 0
    for strategy in order[start + 1 :]:
        e = estimate(cfg, world_size=world_size, strategy=strategy)
        if e and e.total_gb <= budget:
            return f"strategy={strategy} fits ({e.total_gb:.1f} GB)"
    def pick(strategy: str) -> str:
        return "" if strategy == cfg.strategy.name else f"strategy={strategy} "

    best = order[-1] if start < len(order) - 1 else cfg.strategy.name
    for strategy in dict.fromkeys([cfg.strategy.name, "zero3", best]):
        if not t.gradient_checkpointing:
            e = estimate(cfg, world_size=world_size, strategy=strategy, checkpointing=True)
            if e and e.total_gb <= budget:
                return f"{pick(strategy)}train.gradient_checkpointing=true fits ({e.total_gb:.1f} GB)"
        batch = t.per_device_train_batch_size
        for micro in (m for m in range(batch - 1, 0, -1) if batch % m == 0):  # same effective batch
            e = estimate(cfg, world_size=world_size, strategy=strategy, micro_batch=micro, checkpointing=True)
            if e and e.total_gb <= budget:
                accumulation = t.gradient_accumulation_steps * batch // micro
                return f"{pick(strategy)}train.gradient_checkpointing=true train.per_device_train_batch_size={micro} train.gradient_accumulation_steps={accumulation} fits ({e.total_gb:.1f} GB)"
    return "even zero3_offload with a micro-batch of 1 and gradient checkpointing does not fit; use more GPUs (cluster.nodes) or a smaller model"
