"""Consolidated weights any PyTorch user can load: final/model.safetensors and final/config.yaml.

    from safetensors.torch import load_file
    model = GPT(**yaml.safe_load(open("final/config.yaml"))["model"]["kwargs"])   # or your own class
    model.load_state_dict(load_file("final/model.safetensors"))

The end of a run writes final/; `python -m launcher export CHECKPOINT_DIR [OUT_DIR]` writes the
same two files from any checkpoint, on any machine, in one process with no process group.

Export treats the checkpoint as data from a stranger: it imports and instantiates nothing the
checkpoint names. DCP checkpoints (DDP, FSDP): the tensors under "/model/" are allocated with the
shapes and dtypes the metadata records (read through trainer/safe_dcp.py) and filled by DCP, which
reshards N ranks' shards into the plain model. DeepSpeed checkpoints: DeepSpeed's own consolidation
(zero_to_fp32), with every torch.load it makes forced to weights_only=True. The config's model
section is copied as YAML data.

What is and is not protected from a crafted checkpoint, on resume and export: DCP metadata
(safe_dcp's allowlist) and shards (torch.load weights_only=True, inside DCP); ringleader's own
files (JSON, safetensors); DeepSpeed's files (weights_only=True with four plain DeepSpeed classes:
its engine's checkpoint_engine.load on resume, trainer/strategies/deepspeed.py safe_load, and
weights_only_loads here). Not covered: DeepSpeed's universal-checkpoint loaders (ringleader never
turns them on), and the zero_to_fp32.py script DeepSpeed copies into every checkpoint: run by hand,
it unpickles with weights_only=False. The COMPLETE marker catches corruption, not an attacker, who
can recompute its checksums.

Writing never deletes what ringleader did not write: a folder is written whole into a sibling
temporary folder and renamed, or, when it exists, only the files ringleader writes are replaced,
each atomically (os.replace). An export folder carries `.ringleader-export`, listing its files;
export refuses a non-empty folder without it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file

from launcher.schema import ModelConfig, RunConfig
from trainer.build import model_kwargs
from trainer.checkpoint import CheckpointError

EXPORT_MARKER = ".ringleader-export"  # in every folder ringleader exports to; lists the files it wrote
WEIGHTS, CONFIG = "model.safetensors", "config.yaml"
TMP_SUFFIX = ".ringleader-tmp"  # a file or folder being written; ringleader's own, never the user's


# -- writing ---------------------------------------------------------------------------------------


def final_config(cfg: RunConfig) -> str:
    """final/config.yaml: the model section to rebuild it with, and the run's config."""
    model = {"_target_": cfg.model._target_, "name": cfg.model.name, "kwargs": model_kwargs(cfg.model)}
    return OmegaConf.to_yaml({"model": model, "run": OmegaConf.structured(cfg)})


def save_consolidated(folder: Path, state: dict[str, torch.Tensor], cfg: RunConfig) -> None:
    """final/ at the end of a run: weights and the run's config. final/ is ringleader's own, but a
    user may have put files there: only model.safetensors, config.yaml and the marker are replaced
    (and, for a transformers model, the from_pretrained files: hf_files)."""
    config = final_config(cfg)
    if cfg.model.is_transformers:
        state, extra = hf_files(cfg.model, state)
        write_export(folder, state, config, extra=extra)
        return
    write_export(folder, state, config)


# What a from_pretrained folder carries besides its weights, copied from the run's model source.
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def hf_files(model: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """A transformers model's final/ or export as a from_pretrained folder: the weights under their
    own names (a tied lm_head once, as the embedding), config.json and generation_config.json of
    the run's source (name_or_path or config; the dtype set to the saved weights'), the tokenizer's
    files. Files are copied as data: no code of the source or the checkpoint is imported or run."""
    from launcher.hf_config import source_folder

    source = source_folder(model.name_or_path or model.config, revision=model.revision)
    config_path = None if source is None else Path(model.config) if model.config.endswith(".json") else source / "config.json"
    if config_path is None or not config_path.is_file():
        raise CheckpointError(f"model.{'name_or_path' if model.name_or_path else 'config'}: no config.json at {model.name_or_path or model.config}; final/ of a transformers model copies it from there")
    config = json.loads(config_path.read_text())
    if config.get("tie_word_embeddings", True) and any(k.endswith("embed_tokens.weight") for k in state):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    dtypes = {str(v.dtype).removeprefix("torch.") for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        config["dtype"] = config["torch_dtype"] = dtypes.pop()
    config["use_cache"] = True  # for whoever generates from the folder
    extra = {"config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    assert source is not None  # config_path was found in it
    generation = source / "generation_config.json"
    extra["generation_config.json"] = generation.read_bytes() if generation.is_file() else (json.dumps({k: config[k] for k in GENERATION_KEYS if config.get(k) is not None}, indent=2) + "\n").encode()
    extra.update(tokenizer_files(model))
    return state, extra


def tokenizer_files(model: ModelConfig) -> dict[str, bytes]:
    """The tokenizer's files of the run's source, by name, copied as data."""
    from launcher.hf_config import TOKENIZER_FILES, source_folder

    tokenizer = source_folder(model.tokenizer_source, revision=model.revision)
    if tokenizer is None:
        return {}
    return {name: (tokenizer / name).read_bytes() for name in TOKENIZER_FILES if (tokenizer / name).is_file()}


def write_final(folder: Path, strategy, cfg: RunConfig, *, is_main: bool) -> None:
    """final/ of a run (collective). A LoRA run's is the adapter in peft's format, checked against
    the trained model before it is written (trainer/adapter_io.py), with the tokenizer and
    config.yaml; the base weights are not copied."""
    from trainer.adapter_io import adapter_final_files, adapted_model

    if adapted_model(strategy.model) is not None:
        files = adapter_final_files(folder, strategy, base=cfg.model.name_or_path, revision=cfg.model.revision, is_main=is_main)
        if is_main:
            assert files is not None
            write_export(folder, None, final_config(cfg), extra={**files, **tokenizer_files(cfg.model)})
        if dist.is_initialized():
            dist.barrier()
        return
    state = strategy.full_state_dict()  # collective
    if is_main:
        save_consolidated(folder, state, cfg)
    if dist.is_initialized():
        dist.barrier()


def write_export(folder: Path, state: dict[str, torch.Tensor] | None, config: str, *, extra: dict[str, bytes] | None = None) -> None:
    """Write model.safetensors (unless `state` is None: a LoRA adapter's folder), config.yaml,
    `extra` and the marker into folder, deleting nothing ringleader did not write.

    A new folder is written as a sibling temporary folder and renamed: it appears whole or not at
    all. In an existing one the marker comes first (so a crash leaves a folder export recognises as
    its own), then each file is written under a temporary name beside its target and renamed onto
    it; what else the folder holds stays, except the files an earlier export listed that this one
    does not write (an adapter's files beside merged weights would make loaders pick the adapter)."""
    # Tied weights share storage, which safetensors refuses: each key gets its own copy.
    tensors = None if state is None else {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    extra = extra or {}
    names = [*([WEIGHTS] if tensors is not None else []), CONFIG, *extra]
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}{TMP_SUFFIX}-{os.getpid()}")
        tmp.mkdir()
        try:
            write_marker(tmp, names)
            write_files(tmp, tensors, config, extra=extra)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, nothing else
            raise
        return
    earlier = marker_files(folder)
    write_marker(folder, sorted(set(names) | set(earlier)))
    staged = write_files(folder, tensors, config, temporary=True, extra=extra)
    for tmp, name in staged:
        os.replace(tmp, folder / name)
    stale = [name for name in earlier if name not in names and name != EXPORT_MARKER]
    for name in stale:  # listed by ringleader's own marker: its files, no one else's
        (folder / name).unlink(missing_ok=True)
    if stale:
        write_marker(folder, sorted(names))


def write_files(folder: Path, tensors: dict[str, torch.Tensor] | None, config: str, *, temporary: bool = False, extra: dict[str, bytes] | None = None) -> list[tuple[Path, str]]:
    """The weights (unless `tensors` is None), config.yaml and `extra`'s files, each fsynced; with
    `temporary`, under names to rename later (returned)."""
    staged = []
    extra = extra or {}
    for name in ([WEIGHTS] if tensors is not None else []) + [CONFIG, *extra]:
        path = folder / (f".{name}{TMP_SUFFIX}" if temporary else name)
        if name == WEIGHTS and tensors is not None:
            save_file(tensors, str(path), metadata={"format": "pt", "producer": "ringleader"})
        elif name in extra:
            path.write_bytes(extra[name])
        else:
            path.write_text(config)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        staged.append((path, name))
    return staged


def write_marker(folder: Path, names: list[str]) -> None:
    tmp = folder / f"{EXPORT_MARKER}{TMP_SUFFIX}"
    tmp.write_text(json.dumps({"written_by": "ringleader", "files": names}) + "\n")
    os.replace(tmp, folder / EXPORT_MARKER)


def marker_files(folder: Path) -> list[str]:
    """The files an earlier export listed (names only, no paths), or [] when unreadable."""
    try:
        files = json.loads((folder / EXPORT_MARKER).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [f for f in files if isinstance(f, str) and "/" not in f and f not in ("", ".", "..")] if isinstance(files, list) else []


def check_out_dir(out: Path, checkpoint: Path) -> None:
    """Refuse an OUT_DIR export would damage: a file, the checkpoint, a folder above it (the run
    directory, the current folder...), a folder inside checkpoints/, or a non-empty folder that is
    not an earlier export. Raises CheckpointError naming OUT_DIR and the fix."""
    fix = f"give a new or empty folder, e.g. {checkpoint.parent.parent / 'exports' / checkpoint.name}"
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export OUT_DIR: {out} is a file; {fix}")
    if out == checkpoint or out in checkpoint.parents:
        what = "the checkpoint" if out == checkpoint else "a folder that holds the checkpoint"
        raise CheckpointError(f"export OUT_DIR: {out} is {what}; export never writes there, {fix}")
    if checkpoint.parent in out.parents:
        raise CheckpointError(f"export OUT_DIR: {out} is inside {checkpoint.parent}, where checkpoints live; {fix}")
    if out.is_dir() and not (out / EXPORT_MARKER).is_file() and any(out.iterdir()):
        raise CheckpointError(f"export OUT_DIR: {out} is not empty and not an earlier export (no {EXPORT_MARKER}); export deletes nothing it did not write: {fix}")


# -- reading ---------------------------------------------------------------------------------------


def export_checkpoint(checkpoint: Path, out: Path | None = None, *, merge: bool = False) -> Path:
    """Write model.safetensors + config.yaml from a checkpoint folder into `out` (by default
    <run>/exports/<checkpoint name>/, with `-merged` for a merge). A LoRA run's checkpoint gives
    its adapter in peft's format, or with `merge` the base with the adapter merged in as a plain
    transformers folder. Raises CheckpointError naming a bad file or folder; then nothing has been
    written."""
    from trainer.checkpoint import verify

    checkpoint = checkpoint.expanduser().resolve()
    verify(checkpoint)  # every file against the COMPLETE marker, before anything is read
    config = export_config(checkpoint)
    run = yaml.safe_load(config)["run"]
    lora = lora_section(run)
    if merge and lora is None:
        raise CheckpointError(f"export --merge: {checkpoint} is not a LoRA run's checkpoint (no peft adapter in its config), so there is nothing to merge; drop --merge")
    out = (out or checkpoint.parent.parent / "exports" / (checkpoint.name + ("-merged" if merge else ""))).expanduser().resolve()
    check_out_dir(out, checkpoint)
    if (checkpoint / "dcp").is_dir():
        weights = read_dcp_model(checkpoint / "dcp")
    elif (checkpoint / "deepspeed").is_dir():
        weights = read_deepspeed_model(checkpoint)
    else:
        raise CheckpointError(f"{checkpoint}: neither dcp/ nor deepspeed/ inside; not a ringleader checkpoint")
    model = ModelConfig(**run["model"])
    if lora is not None:
        from trainer.adapter_io import export_adapter, merged_weights

        adapter = export_adapter(out, weights, model, lora, source=checkpoint)
        if merge:
            weights, extra = hf_files(model, merged_weights(model, adapter, scratch=out))
            write_export(out, weights, config, extra=extra)
        else:
            write_export(out, None, config, extra={**adapter, **tokenizer_files(model)})
        return out
    if model.is_transformers:  # a from_pretrained folder, its files from the run's source (as final/)
        weights, extra = hf_files(model, weights)
        write_export(out, weights, config, extra=extra)
        return out
    write_export(out, weights, config)
    return out


def lora_section(run: dict[str, Any]) -> dict[str, Any] | None:
    """The peft group of a run's config (read as data) when the run trained a LoRA adapter."""
    section = run.get("peft") if isinstance(run, dict) else None
    if not isinstance(section, dict) or section.get("method", "none") in (None, "", "none"):
        return None
    return section


def export_config(checkpoint: Path) -> str:
    """config.yaml of the export, from the checkpoint's config read as YAML data (safe_load: no
    tags, no interpolation resolved, nothing imported): the model section as final/ has it, and the
    run's config as it was."""
    path = checkpoint / CONFIG
    if not path.is_file():  # checkpoints from before the config was saved with them
        path = checkpoint.parent.parent / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{checkpoint / CONFIG}: missing, and no run config at {path}; export needs the model's settings")
    try:
        run = yaml.safe_load(path.read_text())
        section = run["model"]
        model_cfg = ModelConfig(**section)
        model = {"_target_": model_cfg._target_, "name": model_cfg.name, "kwargs": model_kwargs(model_cfg)}
        return yaml.safe_dump({"model": model, "run": run}, sort_keys=False)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a ringleader run config with a model section ({type(exc).__name__}: {exc})") from None


def read_dcp_model(folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors of a DCP folder, by the plain model's names: every "/model/<name>"
    entry of the metadata, allocated as recorded and filled by DCP. Nothing is instantiated."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from trainer.safe_dcp import SafeFileSystemReader, UnsafeCheckpointError

    try:
        metadata = SafeFileSystemReader(str(folder)).read_metadata()
    except (UnsafeCheckpointError, OSError) as exc:
        raise CheckpointError(str(exc)) from None
    source = folder / ".metadata"
    entries = {k: m for k, m in metadata.state_dict_metadata.items() if isinstance(k, str) and k.startswith("/model/")}
    if not entries:
        raise CheckpointError(f"{source}: no model tensors (no '/model/...' entries); not a ringleader checkpoint")
    # A crafted metadata could ask for a tensor of any size: what DCP reads fits in the shards.
    budget = sum(p.stat().st_size for p in folder.glob("*.distcp"))
    state, total = {}, 0
    for key, meta in entries.items():
        if not isinstance(meta, TensorStorageMetadata) or not isinstance(meta.properties.dtype, torch.dtype) or not all(isinstance(n, int) and n >= 0 for n in meta.size):
            raise CheckpointError(f"{source}: entry {key} is not a tensor of known shape and dtype")
        total += math.prod(meta.size) * meta.properties.dtype.itemsize
        if total > budget:
            raise CheckpointError(f"{source}: the model's tensors would take more than the {budget} bytes of shards in {folder}; the metadata is corrupt or crafted")
        state[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    load_dcp_tensors(folder, state)
    return {k.removeprefix("/model/"): v for k, v in state.items()}


def load_dcp_tensors(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Fill `state` in place from a DCP folder, in this process alone, without unsafe unpickling."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from trainer.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), planner=SafeLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"{folder}: cannot read the model's tensors ({type(exc).__name__}: {exc})") from exc


def read_deepspeed_model(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a DeepSpeed (ZeRO 1/2/3) checkpoint, consolidated by DeepSpeed's
    zero_to_fp32 from every rank's partition, as final/ holds them. Its torch.load calls ask for
    weights_only=False; weights_only_loads forces True, so a crafted file cannot run code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.strategies.deepspeed import TAG

    try:
        with weights_only_loads(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{checkpoint / TAG}: cannot consolidate the DeepSpeed checkpoint ({type(exc).__name__}: {exc})") from None
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """torch.load, for the duration, with weights_only=True whatever the caller asks, allowing only
    the four DeepSpeed classes with plain attributes its checkpoints hold (the same as
    trainer/strategies/deepspeed.py safe_load, which resume uses). The export verb is one thread in
    a process of its own, so swapping the function is contained."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(f: Any, map_location: Any = None, *args: Any, weights_only: Any = None, **kwargs: Any) -> Any:
        try:
            return original(f, map_location, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:  # torch's message is a page; the refused name is in it
            refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f"refusing to unpickle {refused.group(1)}" if refused else "refusing to unpickle it"
            raise CheckpointError(f"{f}: {what}; DeepSpeed's files are read with weights_only=True, and this one holds more than tensors") from None

    torch.load = load
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
            yield
    finally:
        torch.load = original
