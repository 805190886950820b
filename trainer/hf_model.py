"""Transformers causal LMs for ringleader: build one (pretrained weights, or a config with random
weights), expose what the strategies need (decoder layers to shard, the checkpointing switch),
load weights in a way that scales with sharding, and write final/ as a from_pretrained folder.

Loading, by strategy (HFModelSpec.load_plan):
  ddp           every rank calls from_pretrained: one full copy per rank, as DDP needs anyway.
  fsdp          every rank builds the model on the meta device (no memory), the strategy shards
                it (fully_shard per decoder layer), `materialize` allocates each rank's shards,
                and `load_full_state_dict` streams rank 0's safetensors into the shards one
                tensor at a time (read with pread, trainer/safetensors_reader.py: no memory map).
  zero3         build inside deepspeed.zero.Init (transformers' own construction context while an
                HfDeepSpeedConfig for stage 3 is alive): parameters are partitioned as created;
                then `zero3_load_pretrained` fills them one parameter at a time, rank 0 reading
                each tensor and scattering it into the ranks' partitions. Checkpoints whose
                names or shapes differ from the model (transformers' key conversions), remote
                code and quantised bases take transformers' own ZeRO-3 from_pretrained instead.
                Wired in trainer/build.py: zero3_pretrained (pretrained weights) and zero3_random
                (random weights: rank 0 makes the seeded values and copies them into the partitions).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Mask interfaces that honour transformers' packed-sequence detection (collate.py's docstring).
PACKING_ATTN = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
SHIPPED_TINY = Path(__file__).resolve().parent / "assets" / "llama_tiny"


@dataclass(kw_only=True)
class HFModelSpec:
    """The `model` group's fields for a transformers causal LM (names proposed for the schema)."""

    name_or_path: str = ""  # a local folder or a hub id with weights; "" = random weights from `config`
    config: str | dict[str, Any] = ""  # random init: a config.json (or its folder) or a dict
    revision: str = ""
    dtype: str = "float32"  # weights' dtype as loaded: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # eager | sdpa | flex_attention | flash_attention_2 | ...
    trust_remote_code: bool = False
    tokenizer: str = ""  # "" = the model's folder or id (the config's folder for random weights)
    device_map: Any = None  # refused: ringleader places the model
    quantization: Any = None  # QLoRA: a transformers BitsAndBytesConfig (trainer/lora.py bnb_config)

    def check(self) -> None:
        if self.device_map not in (None, "", {}):
            raise ValueError("model.device_map: ringleader places the model on its ranks; remove model.device_map")
        if bool(self.name_or_path) == bool(self.config):
            raise ValueError("model.name_or_path / model.config: set exactly one (pretrained weights, or a config for random weights)")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}; set model.dtype")

    def tokenizer_source(self) -> str:
        if self.tokenizer:
            return self.tokenizer
        if self.name_or_path:
            return self.name_or_path
        if isinstance(self.config, str):
            path = Path(os.path.expanduser(self.config))
            return str(path if path.is_dir() else path.parent)
        raise ValueError("model.tokenizer: a model built from a config dict needs a tokenizer; set model.tokenizer")


def load_config(spec: HFModelSpec):
    from transformers import AutoConfig, PretrainedConfig

    if spec.name_or_path:
        cfg = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision or None, trust_remote_code=spec.trust_remote_code)
    elif isinstance(spec.config, dict):
        kind = dict(spec.config)
        from transformers import CONFIG_MAPPING

        cfg = CONFIG_MAPPING[kind.pop("model_type")](**kind)
    else:
        cfg = AutoConfig.from_pretrained(os.path.expanduser(spec.config), trust_remote_code=spec.trust_remote_code)
    assert isinstance(cfg, PretrainedConfig)
    cfg._attn_implementation = spec.attn_implementation or None
    cfg.use_cache = False  # training: no KV cache (and the packed-sequence mask needs none)
    return cfg


def build_causal_lm(spec: HFModelSpec, *, init: str = "full", seed: int = 0):
    """The model. init="full": real tensors (pretrained weights, or random ones seeded by `seed`);
    init="meta": parameters on the meta device, for a strategy that shards first and then calls
    materialize() and load_full_state_dict(); init="zero3" (pretrained weights, an HfDeepSpeedConfig
    for stage 3 alive): partitioned as built, filled by zero3_load_pretrained (transformers' own
    ZeRO-3 from_pretrained where that cannot serve)."""
    from transformers import AutoModelForCausalLM

    spec.check()
    cfg = load_config(spec)
    dtype = DTYPES[spec.dtype]
    if init == "zero3":
        loaded = zero3_load_pretrained(spec, cfg, dtype) if spec.name_or_path and spec.quantization is None else None
        if loaded is not None:
            loaded.config.use_cache = False
            return loaded
        init = "full"  # transformers' ZeRO-3 from_pretrained (rank 0 holds the whole state dict while it loads)
    if init == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    elif init == "full":
        if spec.name_or_path:
            # QLoRA: bitsandbytes quantises each weight as it lands on this rank's GPU (under ZeRO-3,
            # which takes no device_map, as zero.Init places it).
            quantized: dict[str, Any] = {}
            if spec.quantization is not None:
                from transformers.integrations import is_deepspeed_zero3_enabled

                quantized = {"quantization_config": spec.quantization, **({} if is_deepspeed_zero3_enabled() else {"device_map": {"": torch.cuda.current_device()}})}
            model = AutoModelForCausalLM.from_pretrained(
                spec.name_or_path, config=cfg, revision=spec.revision or None, dtype=dtype, trust_remote_code=spec.trust_remote_code, attn_implementation=spec.attn_implementation or None,
                **quantized,
            )
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=spec.trust_remote_code)
    else:
        raise ValueError(f"build_causal_lm: init must be full or meta, got {init!r}")
    model.config.use_cache = False
    return model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers, in order: the modules whose class the model names in
    `_no_split_modules` (what FSDP2 shards one by one, as for GPT.transformer_blocks)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"strategy=fsdp: {type(model).__name__} names no decoder layer class in _no_split_modules; use strategy=ddp or zero3")
    return blocks


def enable_gradient_checkpointing(model: Any, kwargs: dict[str, Any] | None = None) -> None:
    """The model's own switch, non-reentrant (works with FSDP2, DeepSpeed and frozen inputs) unless
    `kwargs` (train.gradient_checkpointing_kwargs, torch.utils.checkpoint's arguments) say otherwise."""
    kwargs = {"use_reentrant": False, **(kwargs or {})}
    # transformers 5 renamed the switch (the old name warns that it goes in v6).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def packing_refusal(model: nn.Module) -> str | None:
    """Why packed samples could see each other in this model, or None when packing is safe: its
    attention implementation must be one whose mask honours packed position ids, and its
    modelling code must build the mask with masking_utils.create_causal_mask (which detects them)."""
    import sys

    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):  # a LoRA PeftModel: the model it adapts
        model = get_base_model()
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if impl not in PACKING_ATTN:
        return f"attn_implementation {impl!r} cannot isolate packed samples (allowed: {', '.join(PACKING_ATTN)})"
    module = sys.modules.get(type(model).__module__)
    if module is None or not any(hasattr(module, name) for name in ("create_causal_mask", "create_sliding_window_causal_mask")):
        return f"{type(model).__name__}'s modelling code does not build its mask with transformers' create_causal_mask, so packed samples would attend to each other"
    return None


# ---------------------------------------------------------------- loading that scales


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-built (and possibly sharded) model's tensors on `device`, uninitialised:
    load_full_state_dict fills the parameters and persistent buffers next. Non-persistent
    buffers (rotary inv_freq) are in no checkpoint: each module holding some is built again from
    its config on `device` (they are small) and its buffers taken."""
    model.to_empty(device=device)
    for module in model.modules():
        names = [n for n in module._buffers if n in module._non_persistent_buffers_set]
        if not names:
            continue
        cfg = getattr(module, "config", None)
        if cfg is None:
            raise ValueError(f"{type(module).__name__} has buffers outside the checkpoint ({', '.join(names)}) and no config to rebuild them; load this model with strategy=ddp")
        with torch.device(device):
            fresh = type(module)(cfg)
        for n in names:
            module._buffers[n] = fresh._buffers[n]


def model_folder(name_or_path: str, *, revision: str = "") -> Path:
    """A model's folder: the local one, or a hub id's cached snapshot."""
    from launcher.hf_config import source_folder

    return source_folder(name_or_path, revision=revision) or Path(os.path.expanduser(name_or_path))


def weight_files(name_or_path: str, *, revision: str = "") -> list[Path]:
    """The safetensors files of a model folder (one file or an index's shards)."""
    folder = model_folder(name_or_path, revision=revision)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ValueError(f"model.name_or_path: {folder} has no model.safetensors; ringleader loads safetensors only (convert .bin weights first)")


def load_full_state_dict(model: nn.Module, name_or_path: str | None, *, rename: Callable[[str], str | None] | None = None, initial: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fill a materialised (possibly FSDP2-sharded) model from rank 0's safetensors files, one
    tensor at a time: rank 0 reads it with file reads into a buffer of its size (no memory map:
    trainer/safetensors_reader.py), every rank receives it and keeps its shard (distribute_tensor
    scatters from rank 0), the buffer goes. Peak extra memory per rank: the largest tensor, not the
    model (torch's set_model_state_dict(broadcast_from_rank0) peaked ~0.9x the weights higher on
    rank 1 for an 88 M-parameter Llama on 2 ranks; safetensors' memory map kept the whole file in
    rank 0's resident set). Other ranks pass None; they know names and shapes from their own
    meta-built model. Needs the process group when the world is larger than 1."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    from trainer.safetensors_reader import SafetensorsReader

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank0 = world == 1 or dist.get_rank() == 0
    targets = model.state_dict()
    # `rename` maps a key of the model to the file's, None for a tensor the file does not hold,
    # which `initial` (rank 0's) gives instead: a LoRA model's adapters (trainer/lora.py).
    source = {k: rename(k) for k in targets} if rename is not None else {k: k for k in targets}
    initial = dict(initial or {})
    reader: SafetensorsReader | None = None
    problem = ""
    if rank0:
        assert name_or_path is not None
        reader = SafetensorsReader(weight_files(name_or_path))
        tied = getattr(model.config, "tie_word_embeddings", False)
        missing = [k for k, src in source.items() if src is not None and src not in reader and not (tied and src.endswith("lm_head.weight"))]
        if missing:
            problem = f"model.name_or_path: {name_or_path} lacks {len(missing)} weights of {type(model).__name__} (e.g. {missing[0]}); is it the same architecture as its config.json?"
    if world > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise ValueError(problem)
    embed = next((src for src in source.values() if src is not None and src.endswith("embed_tokens.weight")), "")
    try:
        with torch.no_grad(), transients_returned():
            for name, target in targets.items():
                local = target.to_local() if isinstance(target, DTensor) else target
                src = source[name]
                if rank0 and src is None:
                    full = initial[name].to(dtype=local.dtype, device=local.device)
                elif rank0:
                    assert reader is not None and src is not None
                    full = reader.read(src if src in reader else embed, dtype=local.dtype).to(local.device)
                else:
                    full = torch.empty(target.shape, dtype=local.dtype, device=local.device)
                if isinstance(target, DTensor):
                    target.copy_(distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=0))
                else:
                    if world > 1:
                        dist.broadcast(full, src=0)
                    target.copy_(full)
                del full
    finally:
        if reader is not None:
            reader.close()
    tie_weights = getattr(model, "tie_weights", None)
    if tie_weights is not None:
        tie_weights()


GLIBC_MMAP_THRESHOLD = 128 << 10  # glibc's initial M_MMAP_THRESHOLD
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # the most its dynamic rule raises it to (64-bit)


@contextlib.contextmanager
def transients_returned() -> Iterator[None]:
    """While streaming weights in, large transient buffers go back to the system when freed:
    glibc's M_MMAP_THRESHOLD fixed at its initial 128 KiB. By default glibc raises the threshold
    to the size of each large block freed, after which blocks that size come from the heap and
    freed ones stay resident; gloo receives into buffers of its own threads' arenas too. Measured
    on 2 ranks loading an 88 M-parameter Llama under zero3: +113 MiB on rank 1 that malloc_trim
    would give back, none with the fixed threshold. Fixing it turns glibc's dynamic rule off for
    the process, so afterwards it is fixed at the rule's ceiling (32 MiB, trim at twice it):
    training's blocks below that come from the heap and are reused, as the rule would let them
    once a block that large was freed. Not glibc (musl, macOS): nothing changes."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(m_mmap_threshold, GLIBC_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, GLIBC_MMAP_THRESHOLD_MAX)
        libc.mallopt(m_trim_threshold, 2 * GLIBC_MMAP_THRESHOLD_MAX)


def scatterable(p: Any, world: int) -> bool:
    """Whether a ZeRO-3 parameter's partition can be written in place: held in memory (not
    swapped to NVMe), partitioned over the whole world, no secondary (hpZ) copy to keep in step."""
    import torch.distributed as dist

    part = getattr(p, "ds_tensor", None)
    if part is None or getattr(part, "final_location", None) is not None or getattr(p, "ds_secondary_tensor", None) is not None:
        return False
    group = getattr(p, "ds_process_group", None)
    return world == 1 or dist.get_world_size(group=group) == world


def scatter_into_partition(p: Any, full: torch.Tensor | None, world: int) -> None:
    """Rank 0's whole tensor (`full`; None elsewhere) into every rank's ZeRO-3 partition of `p`.
    DeepSpeed's layout (partition_parameters.py _partition_param): rank r holds elements
    [r*n, (r+1)*n) of the flattened parameter, n = ds_tensor.numel(), the last rank's padded.
    Each rank receives its slice straight into ds_tensor: no rank but 0 holds the whole tensor
    (GatheredParameters would allocate it on every rank, and the allocator kept those buffers)."""
    import torch.distributed as dist

    part = p.ds_tensor
    n = part.numel()
    chunks: list[torch.Tensor] | None = None
    if full is not None:
        flat = full.reshape(-1)
        chunks = []
        for r in range(world):
            piece = flat[r * n : (r + 1) * n]
            if piece.numel() < n:  # the padded tail (DeepSpeed leaves it unset; zeros here)
                piece = torch.cat([piece, piece.new_zeros(n - piece.numel())])
            chunks.append(piece.contiguous())
    if world == 1:
        assert chunks is not None
        part.copy_(chunks[0])
    else:
        dist.scatter(part, chunks, src=0, group=getattr(p, "ds_process_group", None))


def zero3_load_pretrained(spec: HFModelSpec, cfg: Any, dtype: torch.dtype) -> Any:
    """Pretrained weights under ZeRO-3 (an HfDeepSpeedConfig for stage 3 alive, the process group
    up), without transformers' ZeRO-3 loader, whose rank 0 holds the whole state dict while it
    loads (2.3x one copy of the weights on the node for an 88 M-parameter Llama on 2 ranks).
    Every rank builds the model in transformers' own construction context for from_pretrained
    (deepspeed.zero.Init, weight init skipped, buffers' dtypes kept): each parameter is
    partitioned as its module is made. Then one parameter at a time: rank 0 reads the file's
    tensor (trainer/safetensors_reader.py) and scatters it, each rank receiving its slice straight
    into its partition (scatter_into_partition; GatheredParameters with rank 0 as the modifier
    where a partition cannot be written in place). Persistent buffers (not partitioned) are read
    by rank 0 and broadcast. Large transients go back to the system as they are freed
    (transients_returned). Measured (benchmarks/bench_hf_load.py): the node's peak ~1.05x one
    copy of the weights, of which each rank holds its partition.
    Returns None, on every rank alike, where this cannot load the file faithfully: no local
    safetensors, remote code, or a checkpoint whose names or shapes are not the model's (the
    conversions from_pretrained applies); the caller then uses from_pretrained."""
    import deepspeed
    import torch.distributed as dist

    from trainer.safetensors_reader import SafetensorsReader

    log = logging.getLogger("ringleader")
    try:  # transformers' internals of from_pretrained (5.x); another version: its own loader, on every rank alike
        from transformers.modeling_utils import patch_output_recorders
        from transformers.models.auto.auto_factory import _get_model_class
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        from transformers.utils.generic import ContextManagers
    except ImportError as e:
        log.info("zero3: %s; transformers' ZeRO-3 from_pretrained loads %s", e, spec.name_or_path)
        return None
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank0 = world == 1 or dist.get_rank() == 0

    def agreed(value: str) -> str:  # rank 0's word, on every rank
        if world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    cls: Any = None
    if not spec.trust_remote_code and type(cfg) in MODEL_FOR_CAUSAL_LM_MAPPING:
        cls = _get_model_class(cfg, MODEL_FOR_CAUSAL_LM_MAPPING)  # what AutoModelForCausalLM picks
    if cls is None:
        log.info("zero3: %s has no built-in transformers class; transformers' ZeRO-3 from_pretrained loads it", spec.name_or_path)
        return None
    reader: SafetensorsReader | None = None
    problem = ""
    if rank0:
        try:
            reader = SafetensorsReader(weight_files(spec.name_or_path, revision=spec.revision))
        except (ValueError, OSError) as e:
            problem = str(e)
    if problem := agreed(problem):
        log.info("zero3: %s; transformers' ZeRO-3 from_pretrained loads it", problem)
        return None
    cfg = copy.deepcopy(cfg)
    cfg.dtype = dtype  # as from_pretrained(dtype=) records it (config.json of final/)
    cfg.name_or_path = spec.name_or_path
    with transients_returned():
        try:
            with ContextManagers(cls.get_init_context(dtype, False, False, False)):
                model = cls(cfg)
                patch_output_recorders(model)
            model.tie_weights()  # the init context defers tying; tied parameters are loaded once
            groups: dict[int, tuple[list[str], Any]] = {}
            for name, p in model.named_parameters(remove_duplicate=False):
                groups.setdefault(id(p), ([], p))[0].append(name)
            persistent = set(model.state_dict().keys())
            buffers = [(n, b) for n, b in model.named_buffers() if n in persistent]
            keys: list[str] = []  # rank 0: the file's key for each parameter, in the model's order
            if rank0:
                assert reader is not None
                for names, p in groups.values():
                    shape = tuple(getattr(p, "ds_shape", p.shape))
                    key = next((n for n in names if n in reader), None)
                    if key is None or reader.shape(key) != shape:
                        problem = f"{spec.name_or_path}: {names[0]} is {'not in the file' if key is None else f'{list(reader.shape(key))} in the file, {list(shape)} in the model'}"
                        break
                    keys.append(key)
            if problem := agreed(problem):
                log.info("zero3: %s (a checkpoint transformers converts as it loads); transformers' ZeRO-3 from_pretrained loads it", problem)
                return None
            with torch.no_grad():
                for i, (names, p) in enumerate(groups.values()):
                    if scatterable(p, world):
                        full = None
                        if rank0:
                            assert reader is not None
                            full = reader.read(keys[i], dtype=p.ds_tensor.dtype).to(p.ds_tensor.device)
                        scatter_into_partition(p, full, world)
                        del full
                        continue
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):  # every rank holds it in full for a moment
                        if rank0:
                            assert reader is not None
                            reader.read(keys[i], out=p.data)
                for name, buf in buffers:
                    found = agreed("yes" if rank0 and reader is not None and name in reader else "")
                    if found:
                        if rank0:
                            assert reader is not None
                            reader.read(name, out=buf)
                        if world > 1:
                            dist.broadcast(buf, src=0)
        finally:
            if reader is not None:
                reader.close()
    if rank0:
        log.info("zero3: rank 0 read %d tensors of %s into the partitions, one at a time", len(keys), spec.name_or_path)
    model.eval()  # as from_pretrained leaves it
    folder = model_folder(spec.name_or_path, revision=spec.revision)
    if model.can_generate() and (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


# ---------------------------------------------------------------- final/


def save_pretrained_dir(out: str | os.PathLike, state_dict: dict[str, torch.Tensor], *, config, tokenizer=None, max_shard_size: str = "5GB") -> Path:
    """Write a from_pretrained folder (config.json, model.safetensors or shards with their index,
    generation_config.json, the tokenizer's files) from a full state dict (rank 0's, after the
    strategy gathered it). The model is built on the meta device only to let transformers
    name the files and drop tied duplicates; no weights are copied. Written under a temporary
    name and renamed, so a crash leaves no half folder."""
    import shutil

    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    shell.generation_config = GenerationConfig.from_model_config(config)
    shell.config.use_cache = True  # for whoever generates from the folder
    shell.save_pretrained(tmp, state_dict={k: v.detach().contiguous() for k, v in state_dict.items()}, max_shard_size=max_shard_size, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@dataclass(kw_only=True)
class LoadPlan:
    """How each strategy loads: `init` for build_causal_lm, and whether rank 0 streams weights
    after the strategy shards (see the module docstring)."""

    init: str = "full"
    rank0_broadcast: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def load_plan(strategy: str, *, pretrained: bool) -> LoadPlan:
    if strategy == "fsdp" and pretrained:
        return LoadPlan(init="meta", rank0_broadcast=True)
    # Random weights are made in full on each rank (the same seed gives the same model on every
    # strategy, which the cross-strategy loss tests need); a large model trained from scratch
    # would want meta init + sharded init_weights, not needed for the shipped tiny one.
    if strategy.startswith("zero3"):
        return LoadPlan(init="zero3")  # deepspeed.zero.Init; to wire with the DeepSpeed strategy
    return LoadPlan(init="full")
