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

LoRA/QLoRA (peft): only the adapter trains, so the table above applies to the adapter's A
parameters (counted from config.json: r x (in + out) per targeted Linear, plus modules_to_save);
the frozen base F = Ψ - A holds no gradients and no optimizer state, only its weights, in the
dtype they are held in (model.dtype; 16-bit under DeepSpeed with bf16/fp16, which casts the
module), sharded by fsdp and zero3 (/N), whole on every rank otherwise. QLoRA's base Linear
weights take 0.5 byte each plus their quantisation constants (fp32 absmax per 64 weights: 1/16
byte; with double quantisation 8-bit absmax: about 1/64 byte); embeddings, norms and the head keep
model.dtype; fsdp keeps the 4-bit weights whole on each rank (FSDP2 would lose their
quantisation state), zero3 partitions them. Activations of a transformers model: about 6 h + 4 intermediate values per token and
layer (the residual stream alone when checkpointed), and the logits.
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


LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_LINEARS = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


def decoder_linears(config: dict) -> dict[str, tuple[int, int]] | None:
    """The Linear layers of one decoder layer as peft names them, with (in, out) features; None for
    an architecture the launcher does not know (launcher/hf_config.py counts the same ones)."""
    from launcher.hf_config import LLAMA_LIKE

    kind = config.get("model_type", "")
    if kind == "gpt2":
        h = config["n_embd"]
        inner = config.get("n_inner") or 4 * h
        return {"c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, inner), "mlp.c_proj": (inner, h)}
    if kind not in LLAMA_LIKE or kind == "phi3":  # phi3 fuses qkv and gate/up under other names
        return None
    h, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    inter = config["intermediate_size"]
    return {
        "q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }


def lora_counts(cfg: RunConfig, config: dict) -> tuple[int, int] | None:
    """(adapter parameters, base Linear weights of the targeted layers) for the peft settings; None
    when the architecture or a regex target cannot be counted without building the model."""
    p = cfg.peft
    linears = decoder_linears(config)
    if linears is None:
        return None
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 0
    if p.target_modules == "all-linear":
        chosen = list(linears)
    elif isinstance(p.target_modules, list):
        chosen = [name for name in linears if any(name == t or name.endswith("." + t) or name.split(".")[-1] == t for t in p.target_modules)]
    else:
        return None  # a regex: peft matches it against the built model's module names
    adapter = layers * sum(p.r * (linears[n][0] + linears[n][1]) for n in chosen)
    vocab = config.get("vocab_size", 0)
    hidden = config.get("hidden_size") or config.get("n_embd") or 0
    adapter += sum(vocab * hidden for m in p.modules_to_save if m in ("lm_head", "embed_tokens", "wte"))
    base_linear = layers * sum(i * o for i, o in linears.values())
    return adapter, base_linear


def hf_activation_bytes(config: dict, *, tokens: int, element: float, checkpointing: bool) -> float | None:
    """Activations one micro-batch of a transformers decoder keeps for backward (see the docstring)."""
    h = config.get("hidden_size") or config.get("n_embd")
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    if not h or not layers:
        return None
    inter = config.get("intermediate_size") or config.get("n_inner") or 4 * h
    per_layer = tokens * (6 * h + 4 * inter) * element
    residual = tokens * h * 4.0
    logits = tokens * config.get("vocab_size", 0) * (element + 8.0)
    if checkpointing:
        return layers * residual + per_layer + logits
    return layers * per_layer + residual + logits


def transformers_config(cfg: RunConfig) -> dict | None:
    from launcher.hf_config import read_config, source_folder

    m = cfg.model
    folder = source_folder(m.name_or_path or m.config, revision=m.revision)
    return read_config(folder) if folder is not None else None


def frozen_bytes(cfg: RunConfig, strategy: str, *, world_size: int) -> float:
    """Bytes per frozen base weight on one rank (not quantised; see the docstring)."""
    held = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}.get(cfg.model.dtype, 4.0)
    if strategy.startswith("zero") and (cfg.train.bf16 or cfg.train.fp16):
        held = 2.0  # DeepSpeed casts the module to 16 bits
    return held / world_size if strategy in ("fsdp", "zero3", "zero3_offload") else held


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
    per_rank: dict[str, float]  # GB; with LoRA, parameters/gradients/optimizer are the adapter's
    trainable: int = 0  # parameters that train: all of them, or the adapter's
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
    config = transformers_config(cfg) if cfg.model.is_transformers else None
    trainable = psi
    if cfg.peft.enabled:  # the table applies to the adapter; the frozen base holds its weights only
        counts = lora_counts(cfg, config) if config else None
        if counts is None:
            return None
        trainable, base_linear = counts
        frozen = psi  # peft keeps every base weight (modules_to_save keep their frozen original too)
        per_weight = frozen_bytes(cfg, strategy, world_size=world_size)
        frozen_gb = frozen * per_weight / GB
        if cfg.peft.method == "qlora":  # the targeted Linear weights in 4 bits (with their constants)
            four_bit = 0.5 + (1 / 64 if cfg.peft.bnb_4bit_use_double_quant else 1 / 16)
            shard = world_size if strategy == "zero3" else 1  # fsdp keeps them whole (trainer/strategies/fsdp.py)
            frozen_gb -= base_linear * (per_weight - four_bit / shard) / GB
        per_rank = {"frozen_parameters": frozen_gb, **{name: trainable * b / GB for name, b in states.items()}}
    if config is not None:
        element = 2.0 if (cfg.train.bf16 or cfg.train.fp16) else 4.0
        tokens = micro_batch * cfg.data.seq_len
        act = hf_activation_bytes(config, tokens=tokens, element=element, checkpointing=False)
        act_ckpt = hf_activation_bytes(config, tokens=tokens, element=element, checkpointing=True)
        if act is not None and act_ckpt is not None:
            per_rank["activations"] = (act_ckpt if checkpointing else act) / GB
            per_rank["activations_without_checkpointing" if checkpointing else "activations_if_checkpointed"] = (act if checkpointing else act_ckpt) / GB
    if builtin:
        act = activation_bytes(cfg, micro_batch=micro_batch, checkpointing=False) / GB
        act_ckpt = activation_bytes(cfg, micro_batch=micro_batch, checkpointing=True) / GB
        per_rank["activations"] = act_ckpt if checkpointing else act
        per_rank["activations_without_checkpointing" if checkpointing else "activations_if_checkpointed"] = act if checkpointing else act_ckpt
    total = sum(v for k, v in per_rank.items() if k in ("frozen_parameters", "parameters", "gradients", "optimizer", "activations"))
    per_rank["total"] = total
    return MemoryEstimate(parameters=psi, per_rank=per_rank, total_gb=total, trainable=trainable)


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
    memory = {"num_parameters": float(est.parameters), **({"num_trainable_parameters": float(est.trainable)} if cfg.peft.enabled else {}), **est.per_rank}
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
