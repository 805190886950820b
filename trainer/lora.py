"""LoRA and QLoRA through peft (the `peft` group, launcher/schema.py PeftConfig): the LoraConfig and
BitsAndBytesConfig built from the schema, adapters applied to a built transformers model before a
strategy wraps it, the adapters' initial values, and which state-dict keys are the adapter's.

How a LoRA model is built (trainer/build.py), on every strategy:
  1. the base loads as for full training (ddp/zero1/zero2: in full on each rank; fsdp: on the meta
     device, filled after sharding; zero3: partitioned inside deepspeed.zero.Init); QLoRA loads it
     in 4 bits (BitsAndBytesConfig) and runs peft's prepare_model_for_kbit_training;
  2. `get_peft_model` injects the adapters and freezes everything else; the strategy wraps the
     PeftModel (trainer/model_io.py calls it as the transformers model it adapts; FSDP shards its
     decoder layers; trainer/adapter_io.py writes the adapter with peft's own writer);
  3. the adapters get their initial values from `initial_values`: peft's own initialisation
     (lora_A Kaiming-uniform with a = sqrt(5), lora_B zero) drawn from a generator seeded by
     train.seed, in parameter-name order, on the CPU. So every strategy and world size starts from
     the same adapter, whether its parameters exist here (ddp, zero) or only after sharding (fsdp's
     meta build: trainer/hf_model.py load_full_state_dict takes them from here).

State-dict keys of the adapted model are the base's behind PeftModel's prefix, with peft's layer
names inside:
  base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight     the frozen base weight
  base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight  the adapter (lora_B likewise)
  base_model.model.lm_head.modules_to_save.default.weight                a module trained whole
  base_model.model.lm_head.original_module.weight                        its frozen original
`base_key` maps one to the base checkpoint's key (None for an adapter's own tensor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn

from launcher.schema import PeftConfig

if TYPE_CHECKING:
    from trainer.safetensors_reader import SafetensorsReader

log = logging.getLogger("ringleader")
ADAPTER = "default"  # peft's name of the (only) adapter
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's keys
# Parts of a parameter's name that only peft's wrappers add.
ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")
SEED_OFFSET = 0x10AA  # the adapters' generator: train.seed + this, apart from the model's own stream


@dataclass(frozen=True, kw_only=True)
class LoraInfo:
    """What the rest of the trainer needs to know about an adapted model (kept on it as
    `ringleader_lora`; a plain object, not a module)."""

    peft: PeftConfig
    config: Any  # peft.LoraConfig
    seed: int
    base: str  # model.name_or_path


def dtype_of(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8}[name]


def lora_config(p: PeftConfig, *, base: str = "") -> Any:
    """peft's LoraConfig from the schema (field names are peft's)."""
    from peft import LoraConfig

    targets = p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules)
    return LoraConfig(
        r=p.r, lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, target_modules=targets, modules_to_save=list(p.modules_to_save) or None, bias=cast(Any, p.bias),
        task_type="CAUSAL_LM", base_model_name_or_path=base or None,
    )


def bnb_config(p: PeftConfig) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA's 4-bit base."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=p.bnb_4bit_quant_type, bnb_4bit_use_double_quant=p.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=dtype_of(p.bnb_4bit_compute_dtype), bnb_4bit_quant_storage=dtype_of(p.bnb_4bit_quant_storage),
    )


def as_peft_config(p: PeftConfig | Mapping[str, Any]) -> PeftConfig:
    """The `peft` group typed (a checkpoint's config.yaml gives it as a mapping)."""
    if isinstance(p, PeftConfig):
        return p
    known = {f.name for f in dataclasses.fields(PeftConfig)}
    values: dict[str, Any] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dict(p).items() if k in known}
    return PeftConfig(**values)


def apply_lora(model: nn.Module, p: PeftConfig | Mapping[str, Any], *, seed: int = 0, base: str = "", gradient_checkpointing: bool = False) -> nn.Module:
    """Inject the adapters into a built transformers model (before any strategy wraps it): peft's
    PeftModel, everything but the adapters (and modules_to_save, and biases per peft.bias) frozen.
    Adapter tensors that exist get their initial values here; on the meta device (fsdp's build,
    export's shell) they are left for whoever fills the model."""
    from peft import get_peft_model

    p = as_peft_config(p)
    if p.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # Casts the non-quantised parameters (norms) to fp32 for stability and, with checkpointing,
        # makes the inputs require grad; non-reentrant, as ringleader checkpoints everywhere.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = lora_config(p, base=base)
    peft_model = get_peft_model(model, config)
    setattr(peft_model, "ringleader_lora", LoraInfo(peft=p, config=config, seed=seed, base=base))  # a plain attribute, read by strategies and checkpoints
    values = initial_values(peft_model, seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name in values and not param.is_meta:
                param.copy_(values[name].to(param.dtype))
    trainable = sum(param_numel(q) for q in peft_model.parameters() if q.requires_grad)
    total = sum(param_numel(q) for q in peft_model.parameters())
    log.info("%s: %d adapter tensors (r=%d, alpha=%g, targets %s); %d of %d parameters train (%.3g%%)", p.method, len(values), p.r, p.lora_alpha, p.target_modules, trainable, total, 100 * trainable / max(total, 1))
    return peft_model


def lora_info(model: nn.Module) -> LoraInfo | None:
    """The LoraInfo of an adapted model, under DDP's or DeepSpeed's wrapper; None for full training."""
    while True:
        info = model.__dict__.get("ringleader_lora")
        if info is not None:
            return info
        inner = model.__dict__.get("_modules", {}).get("module")
        if inner is None:
            return None
        model = inner


def param_numel(p: torch.Tensor) -> int:
    """Elements of a parameter, whole (ZeRO-3 keeps the full count in ds_numel)."""
    return int(getattr(p, "ds_numel", p.numel()))


def param_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # a DTensor's shape is the global one already


def is_adapter_key(name: str) -> bool:
    """A tensor that belongs to the adapter itself (not in the base checkpoint)."""
    return any(part in name for part in ADAPTER_PARTS)


def initial_values(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The adapters' initial tensors, full size, fp32, on the CPU, by parameter name: peft's
    default initialisation (LoraLayer.reset_lora_parameters with init_lora_weights=True) drawn from
    one generator in name order, so they do not depend on the strategy, the world size or on
    whether the parameters exist yet."""
    gen = torch.Generator().manual_seed(seed + SEED_OFFSET)
    out: dict[str, torch.Tensor] = {}
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not is_adapter_key(name):
            continue
        t = torch.zeros(param_shape(param), dtype=torch.float32)
        if ".lora_A." in name and name.endswith(".weight"):
            nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=gen)
        elif ".lora_embedding_B." in name:
            nn.init.normal_(t, generator=gen)
        # lora_B, lora_embedding_A and their biases start at zero: the adapted model equals the base.
        out[name] = t
    return out


def check_initialised(model: nn.Module) -> None:
    """After a sharded load: each rank's share of every lora_B is zero and of every lora_A is not
    (peft's initialisation: the adapted model starts as the base, and B's gradient is not zero)."""
    for name, param in model.named_parameters():
        if not is_adapter_key(name):
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        nonzero = bool(local.count_nonzero())
        if (".lora_B." in name and nonzero) or (".lora_A." in name and local.numel() and not nonzero):
            raise ValueError(f"peft: {name} is not initialised as peft does (lora_A random, lora_B zero) after the sharded load")


def base_key(name: str) -> str | None:
    """The base checkpoint's key for a parameter of the adapted model (a PeftModel's name); None for
    an adapter tensor."""
    if is_adapter_key(name):
        return None
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".").replace(".original_module.", ".").replace(f".modules_to_save.{ADAPTER}.", ".")


# ---------------------------------------------------------------- the base a checkpoint needs


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")


def base_identity(name_or_path: str, revision: str = "") -> dict[str, Any]:
    """A cheap fingerprint of the base weights a LoRA checkpoint needs (they are not in it): the
    folder, config.json's SHA-256, and each weight file's size and modification time."""
    from launcher.hf_config import source_folder

    folder = source_folder(name_or_path, revision=revision)
    if folder is None:
        return {"name_or_path": name_or_path, "revision": revision}
    config = folder / "config.json"
    files = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in WEIGHT_SUFFIXES and f.name != "config.json":
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    return {
        "name_or_path": name_or_path, "revision": revision, "folder": str(folder),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else "", "files": files,
    }


def base_difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """What changed between two base_identity results, or ""."""
    if saved.get("config_sha256") != now.get("config_sha256"):
        return "its config.json changed"
    a, b = saved.get("files", {}), now.get("files", {})
    for name in sorted(set(a) | set(b)):
        if name not in b:
            return f"{name} is gone"
        if name not in a:
            return f"{name} is new"
        if list(a[name]) != list(b[name]):
            return f"{name} changed (size or modification time)"
    return ""


# ---------------------------------------------------------------- checks


def unwrap(model: nn.Module) -> nn.Module:
    """The PeftModel under DDP's or DeepSpeed's `.module` (FSDP2 shards in place)."""
    while "ringleader_lora" not in model.__dict__ and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module  # type: ignore[assignment]
    return model


def own_piece(p: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's own values of a parameter and the same piece of the full tensor `full`: FSDP2's
    dim-0 shard (ceil(rows / world) rows each), ZeRO-3's flat partition (ceil(numel / world)
    elements each, the last padded), or the whole tensor."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is not None and isinstance(p, dtensor.DTensor):
        local = p.to_local()
        rows = math.ceil(full.shape[0] / p.device_mesh.size()) if full.dim() else 0
        return local, full[rank * rows : rank * rows + local.shape[0]] if full.dim() else full
    if hasattr(p, "ds_tensor"):
        part = p.ds_tensor.view(-1)
        flat = full.reshape(-1)[rank * part.numel() : (rank + 1) * part.numel()]
        return part[: flat.numel()], flat
    return p, full


def check_frozen_unchanged(model: nn.Module) -> tuple[int, int]:
    """At the end of a LoRA run, on every rank: the frozen base weights equal model.name_or_path's,
    bit for bit at the dtype they are held in (a base that moved would no longer fit the adapter).
    Each rank compares its FSDP shards, or its 1/world share of the tensors (replicated
    strategies; ZeRO-3's are gathered one at a time). Returns (tensors
    compared, 4-bit tensors skipped); raises naming the first that differs."""
    import torch.distributed as dist

    from trainer.hf_model import weight_files
    from trainer.safetensors_reader import SafetensorsReader

    model = unwrap(model)
    info = lora_info(model)
    assert info is not None, "not a LoRA model"
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    with SafetensorsReader(weight_files(info.base)) as where:  # one tensor read at a time, no memory map of the base
        return compare_frozen(model, where, base=info.base, rank=rank, world=world)


def compare_frozen(model: nn.Module, where: SafetensorsReader, *, base: str, rank: int, world: int) -> tuple[int, int]:
    """check_frozen_unchanged's loop over the model's frozen parameters, `where` the base's tensors."""
    embed = next((k for k in where.keys() if k.endswith("embed_tokens.weight")), "")
    checked = skipped = 0
    for i, (name, param) in enumerate(model.named_parameters()):
        key = base_key(name)
        if key is None or param.requires_grad or f".modules_to_save.{ADAPTER}." in name:
            continue
        if type(param).__name__ == "Params4bit" or not param.dtype.is_floating_point:
            skipped += 1  # QLoRA's quantised base: nothing to compare with the file's values
            continue
        key = key if key in where else embed  # a tied head is the embedding
        if hasattr(param, "ds_tensor"):  # ZeRO-3: gathered one at a time (collective, every rank in the same order)
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                whole = param.detach().clone()
            if i % world != rank:
                continue
            mine, want = whole, where.read(key)
        else:
            sharded = sys.modules.get("torch.distributed.tensor") is not None and isinstance(param, sys.modules["torch.distributed.tensor"].DTensor)
            if not sharded and i % world != rank:
                continue
            mine, want = own_piece(param.detach(), where.read(key))
        if not torch.equal(mine.cpu(), want.to(mine.dtype)):
            raise RuntimeError(f"peft: the frozen base weight {name} changed during training (it no longer equals {key} of {base}); the adapter would not fit its base")
        checked += 1
    return checked, skipped
