"""LoRA adapters on disk (issue 14 item 3): a LoRA run's final/ and its export in peft's own format
(adapter_config.json + adapter_model.safetensors, for `PeftModel.from_pretrained(base, folder)`),
the check of what was written, and export's merge into a plain transformers folder.

Why the check: under ZeRO-3 the popular tools have written empty or partial adapters without a
word (peft #453 and #1402, trl #4416, DeepSpeed #7900): a partitioned parameter read without its
gather is a 0-element tensor or one rank's slice, and nobody notices until the adapter is loaded.
ringleader measures the live model without the gather that writes the file: every adapter tensor
the model's own peft modules name (each LoRA layer's A and B, each module to save, any other
trainable parameter), its full shape, and its sum of squares over every rank's own share (one
all-reduce). The file peft wrote is then read back: a missing key, another shape, a non-finite
value, zeros where the model's tensor is not (an untrained lora_B starts at zero; a trained one is
not), or tensors that differ from the gathered ones fail the run with the reason, and final/ is not
written.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.checkpoint import CheckpointError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# A 16-bit module (zero1/2 with bf16) against the fp32 master weights written: its sum of squares
# is within ~1%. An empty, zeroed or partial tensor is far outside.
SUMSQ_RTOL = 2e-2
ISSUES = "the ZeRO-3 failure of peft #453/#1402, trl #4416, DeepSpeed #7900"


class AdapterError(CheckpointError):
    """An adapter that is not what the model holds; the message names the folder and the tensors."""


@dataclass(frozen=True, kw_only=True)
class Expected:
    """What the trained model holds for one tensor of the adapter file (keyed by its file key)."""

    shape: tuple[int, ...]
    sumsq: float  # sum of squares over every rank's own share of it


# -- what the model holds --------------------------------------------------------------------------


def adapted_model(model: nn.Module) -> Any | None:
    """The PeftModel a LoRA run trains (trainer/lora.py apply_lora; under DDP's or DeepSpeed's
    `.module`), or None for full training."""
    inner = getattr(model, "module", model)
    return inner if "ringleader_lora" in inner.__dict__ else None


def adapter_keys(model: nn.Module) -> dict[str, str]:
    """The adapter's tensors: the PeftModel's parameter name -> its key in adapter_model.safetensors.
    From the model's own peft modules (every LoRA layer's adapter weights, every module to save),
    then every other trainable parameter (biases with bias=all or lora_only). Keys as peft's
    save_pretrained writes them: without the adapter's name (LoraModel._remove_adapter_name_from_key),
    a module to save under its own name (ModulesToSaveWrapper.adapter_state_dict)."""
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    from trainer.lora import ADAPTER

    keys: dict[str, str] = {}
    for name, module in model.named_modules():
        wrapper = isinstance(module, AuxiliaryTrainingWrapper)
        if not (wrapper or isinstance(module, BaseTunerLayer)):
            continue
        for layer in getattr(module, "adapter_layer_names", ()):
            container = getattr(module, layer, None)
            if container is None or ADAPTER not in container:
                continue
            item = container[ADAPTER]
            named = [("", item)] if isinstance(item, nn.Parameter) else list(item.named_parameters())
            for pname, _ in named:
                key = ".".join(part for part in (name, layer, ADAPTER, pname) if part)
                keys[key] = f"{name}.{pname}" if wrapper else LoraModel._remove_adapter_name_from_key(key, ADAPTER)
    for name, p in model.named_parameters():
        if p.requires_grad and name not in keys:
            keys[name] = LoraModel._remove_adapter_name_from_key(name, ADAPTER)
    return keys


def is_dtensor(t: torch.Tensor) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def own_share(p: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor, bool]:
    """A parameter's full shape, this rank's own share of its values, and whether the shares are
    disjoint slices (FSDP2's DTensor shard, ZeRO-3's partition) or each a whole copy."""
    if is_dtensor(p):
        return tuple(p.shape), p.to_local(), True  # type: ignore[attr-defined]
    if hasattr(p, "ds_tensor"):  # ZeRO-3: the module's tensor is empty, the rank holds ds_tensor
        return tuple(p.ds_shape), p.ds_tensor, True  # type: ignore[attr-defined]
    return tuple(p.shape), p, False


def expected_adapter(model: nn.Module, *, device: torch.device) -> dict[str, Expected]:
    """Collective (one all-reduce): each adapter tensor's full shape and sum of squares, from what
    every rank holds itself, not from the gather that writes the file."""
    params = dict(model.named_parameters())
    keys = adapter_keys(model)
    shapes, sums, sharded = [], [], []
    for name in keys:
        shape, share, disjoint = own_share(params[name])
        shapes.append(shape)
        sums.append(share.detach().double().pow(2).sum().to(device))
        sharded.append(disjoint)
    total = torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1 and any(sharded):
        mask = torch.tensor(sharded, device=device)
        summed = total.masked_fill(~mask, 0.0)
        dist.all_reduce(summed)
        total = torch.where(mask, summed, total)
    values = total.cpu().tolist()
    return {saved: Expected(shape=shape, sumsq=value) for saved, shape, value in zip(keys.values(), shapes, values, strict=True)}


# -- writing and checking ----------------------------------------------------------------------------


def save_adapter(model: Any, state: dict[str, torch.Tensor], folder: Path, *, base: str, revision: str = "") -> dict[str, torch.Tensor]:
    """peft's own PeftModel.save_pretrained of `state` (the PeftModel's keys, gathered: its own
    tensors may be shards or partitions) into `folder`, with the run's base as
    base_model_name_or_path. Returns the tensors peft chose, by file key: what the file must hold."""
    from peft import get_peft_model_state_dict

    from trainer.lora import ADAPTER

    config = model.peft_config[ADAPTER]
    config.base_model_name_or_path = base
    config.revision = revision or None
    if isinstance(config.target_modules, set):  # as peft resolved all-linear; sorted, so that the same run writes the same bytes
        config.target_modules = sorted(config.target_modules)
    # No embedding layers: a LoRA run does not resize them, and they are frozen (not in `state`).
    model.save_pretrained(str(folder), state_dict=state, selected_adapters=[ADAPTER], save_embedding_layers=False, is_main_process=True)
    (folder / "README.md").unlink(missing_ok=True)  # peft's model card: a template, not ringleader's
    return get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER, save_embedding_layers=False)


def check_adapter(folder: Path, expected: dict[str, Expected], *, written: dict[str, torch.Tensor] | None = None, base: str | None = None) -> None:
    """Read the adapter in `folder` back and compare it with what the model holds (`expected`)
    and, when given, with the tensors handed to the writer. Raises AdapterError naming every
    problem (the first few tensors of each kind)."""
    from safetensors.torch import load_file

    problems: list[str] = []
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            problems.append(f"{ADAPTER_CONFIG} is not a LoRA config")
        elif base is not None and config.get("base_model_name_or_path") != base:
            problems.append(f"{ADAPTER_CONFIG} names base {config.get('base_model_name_or_path')!r}, the run's is {base!r}")
    except (OSError, ValueError) as exc:
        problems.append(f"{ADAPTER_CONFIG} unreadable ({type(exc).__name__})")
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as exc:  # a missing, truncated or corrupt file: safetensors raises several kinds
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: cannot be read back ({type(exc).__name__}: {exc}); {ISSUES}?") from None
    missing: list[str] = []
    shape: list[str] = []
    nonfinite: list[str] = []
    zeros: list[str] = []
    differ: list[str] = []
    for key, want in expected.items():
        got = tensors.get(key)
        if got is None:
            missing.append(key)
        elif tuple(got.shape) != want.shape:
            shape.append(f"{key} {list(got.shape)} (the model's {list(want.shape)})")
        elif not bool(torch.isfinite(got).all()):
            nonfinite.append(key)
        else:
            have = float(got.double().pow(2).sum())
            if not math.isclose(have, want.sumsq, rel_tol=SUMSQ_RTOL, abs_tol=1e-12):
                (zeros if have == 0 else differ).append(key)
    if written is not None:
        differ += [k for k, v in written.items() if k in tensors and k not in differ and not torch.equal(tensors[k], v.detach().cpu())]
        missing += [k for k in written if k not in tensors and k not in missing]
    for what, keys in (
        (f"missing ({len(missing)} of {len(expected)} expected)", missing), ("with another shape", shape), ("not finite", nonfinite),
        ("all zeros where the trained model's are not", zeros), ("with other values than the trained model's", differ),
    ):
        if keys:
            problems.append(f"tensors {what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}")
    if problems:
        raise AdapterError(f"{folder}: the adapter written is not the trained one ({ISSUES}): {'; '.join(problems)}")


def adapter_folder_files(model: Any, state: dict[str, torch.Tensor], expected: dict[str, Expected], *, base: str, revision: str, scratch: Path) -> dict[str, bytes]:
    """Write the adapter with peft into a temporary folder beside `scratch`, check it, and return
    the checked files' bytes (what final/ or the export folder then holds)."""
    with tempfile.TemporaryDirectory(dir=scratch.parent, prefix=f".{scratch.name}.adapter-") as tmp:
        folder = Path(tmp)
        written = save_adapter(model, state, folder, base=base, revision=revision)
        check_adapter(folder, expected, written=written, base=base)
        return {name: (folder / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}


def adapter_final_files(folder: Path, strategy: Any, *, base: str, revision: str, is_main: bool) -> dict[str, bytes] | None:
    """final/'s adapter files of a LoRA run, on rank 0 (None elsewhere). Collective: the measure of
    the model and the gather (strategy.full_state_dict of the trainable parameters). A broken
    adapter raises AdapterError on every rank (rank 0's message; the others name rank 0)."""
    model = adapted_model(strategy.model)
    assert model is not None
    expected = expected_adapter(model, device=strategy.device)
    state = strategy.full_state_dict(trainable_only=True)
    files, failure = None, None
    if is_main:
        try:
            absent = [name for name in adapter_keys(model) if name not in state]
            if absent:  # the gather lost them: the file would lack them
                raise AdapterError(f"{folder}: the gathered state lacks {len(absent)} adapter tensors (e.g. {absent[0]}); {ISSUES}")
            files = adapter_folder_files(model, state, expected, base=base, revision=revision, scratch=folder)
        except Exception as exc:
            failure = exc
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([failure is not None], dtype=torch.int32, device=strategy.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if failure is None and bool(flag.item()):
            failure = AdapterError(f"{folder}: rank 0 found the adapter it wrote broken; its error is in result.json and rank 0's log")
    if failure is not None:
        raise failure
    return files


# -- export of a checkpoint ----------------------------------------------------------------------------


def shell_model(model_cfg: Any, peft_section: dict[str, Any]) -> Any:
    """The run's PeftModel as training built it (trainer/lora.py apply_lora), on the meta device:
    nothing allocated, no weights read; the adapter's names and shapes, the LoraConfig as peft
    resolved it, and peft's writer. Built from the source's config.json, never its code. A QLoRA
    run's adapter is a LoRA adapter: the shell needs no 4-bit base."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.lora import apply_lora

    if model_cfg.trust_remote_code:
        raise AdapterError("export: the run's model.trust_remote_code=true, and export runs no code of a model's source; build the model yourself and load the adapter with peft")
    config = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision or None, trust_remote_code=False)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        return apply_lora(base, {**peft_section, "method": "lora"}, base=model_cfg.name_or_path)


def export_adapter(out: Path, weights: dict[str, torch.Tensor], model_cfg: Any, peft_section: dict[str, Any], *, source: Path) -> dict[str, bytes]:
    """The adapter files of a LoRA checkpoint's tensors (`weights`, by the adapted model's names),
    written as final/'s are and checked against the checkpoint's own tensors."""
    model = shell_model(model_cfg, peft_section)
    params = dict(model.named_parameters())
    keys = adapter_keys(model)
    absent = [name for name in keys if name not in weights]
    if absent:
        raise AdapterError(f"{source}: holds no {absent[0]} ({len(absent)} of the {len(keys)} adapter tensors the run's peft settings make are missing); not this run's LoRA checkpoint")
    state = {name: weights[name] for name in keys}
    wrong = [name for name in keys if tuple(state[name].shape) != tuple(params[name].shape)]
    if wrong:
        raise AdapterError(f"{source}: {wrong[0]} has shape {list(state[wrong[0]].shape)}, the run's peft settings make {list(params[wrong[0]].shape)}")
    expected = {saved: Expected(shape=tuple(state[name].shape), sumsq=float(state[name].double().pow(2).sum())) for name, saved in keys.items()}
    return adapter_folder_files(model, state, expected, base=model_cfg.name_or_path, revision=model_cfg.revision, scratch=out)


def merged_weights(model_cfg: Any, adapter: dict[str, bytes], *, scratch: Path) -> dict[str, torch.Tensor]:
    """The base model with the adapter merged in (peft's merge_and_unload), in the run's dtype:
    the base loaded from model.name_or_path in float32 (safetensors only: nothing unpickled, no
    code run), the adapter from the checked files."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainer.hf_model import DTYPES

    if model_cfg.trust_remote_code:
        raise AdapterError("export --merge: the run's model.trust_remote_code=true, and export runs no code of a model's source; merge with peft yourself")
    try:
        base = AutoModelForCausalLM.from_pretrained(
            model_cfg.name_or_path, revision=model_cfg.revision or None, dtype=torch.float32, use_safetensors=True, trust_remote_code=False,
        )
    except (OSError, ValueError) as exc:
        raise AdapterError(f"export --merge: cannot load the base model {model_cfg.name_or_path} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); merge needs its safetensors weights") from None
    with tempfile.TemporaryDirectory(dir=scratch.parent, prefix=f".{scratch.name}.merge-") as tmp:
        for name, data in adapter.items():
            (Path(tmp) / name).write_bytes(data)
        merged = PeftModel.from_pretrained(base, tmp).merge_and_unload()
    dtype = DTYPES[model_cfg.dtype]
    return {k: v.detach().to(dtype) for k, v in merged.state_dict().items()}
