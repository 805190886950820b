"""The rules that need the host, files or data, in one place: `check_environment`, run after the
config's own checks (launcher/schema.py `RunConfig.check`) and before anything is written. Each
raises a ConfigError naming the key and the fix. Reads only; creates nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

from cluster.backend import backend_for
from cluster.environment import Host
from launcher.errors import ConfigError
from launcher import hf_config
from launcher.registry import BITSANDBYTES, PACKING_ATTN
from launcher.options import resolve_report_to
from launcher.rules import require
from launcher.schema import RunConfig
from launcher import corpus

# What may be in a folder before ringleader first writes it as a run directory: Hydra's record of
# a sweep trial (its job folder), nothing else.
BEFORE_A_RUN = {".hydra"}


def check_environment(cfg: RunConfig, host: Host, environ: Mapping[str, str] | None = None) -> None:
    """`cfg` has its hardware resolved (launcher/planner.py resolve_hw) and its paths made absolute."""
    check_files(cfg)
    check_transformers(cfg, os.environ if environ is None else environ)
    check_hardware(cfg)
    for tracker in resolve_report_to(cfg.train.report_to):  # rank 0 imports it: refuse here, not mid-start
        require(tracker == "tensorboard" or importlib.util.find_spec(tracker) is not None, "train.report_to", f"{tracker} is not installed; pip install {tracker}, or drop it")
    backend_for(cfg.cluster.name).check_host(cfg, host, environ)  # local: the GPUs here; SLURM: sbatch here, a path sbatch takes
    run_dir = Path(cfg.train.output_dir)
    check_not_foreign(run_dir)
    if not cfg.dry_run:  # a dry run may plan for a cluster's paths that do not exist here
        check_writable(run_dir, "train.output_dir")
        check_writable(Path(cfg.train.logging_dir), "train.logging_dir")


def check_files(cfg: RunConfig) -> None:
    """The files the config names exist and are what it says."""
    t, m, d = cfg.train, cfg.model, cfg.data
    if t.resume not in ("auto", "none"):
        resume = Path(t.resume).expanduser()
        require(resume.exists(), "train.resume", f"no checkpoint at '{t.resume}'; give auto, none, or an existing checkpoint folder")
        require(is_checkpoint_folder(resume), "train.resume", f"'{t.resume}' is not a complete ringleader checkpoint (no COMPLETE marker); give auto, none, or <run>/checkpoints/step-N")
    require(not m.init_from or Path(m.init_from).expanduser().is_file(), "model.init_from", f"no file at '{m.init_from}'; give a model.safetensors, e.g. <run>/final/model.safetensors")
    if m.init_from:
        problem = safetensors_error(Path(m.init_from).expanduser())
        require(problem is None, "model.init_from", f"'{m.init_from}' is {problem}; give a model.safetensors, e.g. <run>/final/model.safetensors")
    if d.name == "text_files" and not d._target_:
        for i, pattern in enumerate(d.paths):
            require(bool(corpus.text_files([pattern])), f"data.paths.{i}", f"'{pattern}' matches no file; check the path or the glob")
    if d.name == "tokens_bin" and not d._target_:
        require(Path(os.path.expanduser(d.paths[0])).is_file(), "data.paths", f"tokens_bin needs one existing file, got {d.paths}; set data.paths='[/path/train.bin]'")


OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline(environ: Mapping[str, str]) -> bool:
    return any(environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_SWITCHES)


def check_transformers(cfg: RunConfig, environ: Mapping[str, str]) -> None:
    """A transformers model and its text data: the model, config and tokenizer are here (a local
    folder, or a hub id in the hub cache when offline); the data files exist and have the fields
    the format reads; a chat format has a chat template; packing has an attention that isolates
    samples. Reads config.json, tokenizer_config.json and each data file's first record only."""
    m, d = cfg.model, cfg.data
    if m.is_transformers:
        for key, need in (("name_or_path", "config.json"), ("config", "config.json"), ("tokenizer", "tokenizer_config.json")):
            value = getattr(m, key)
            if not value:
                continue
            if hf_config.looks_local(value):
                path = Path(value)
                found = path.is_file() if key == "config" and path.suffix == ".json" else (path / need).is_file() or (key == "tokenizer" and (path / "tokenizer.json").is_file())
                require(path.exists(), f"model.{key}", f"no such file or folder: {value}; give a local model folder or a hub id (ORG/NAME)")
                require(found, f"model.{key}", f"{value} has no {need}; give a folder saved with save_pretrained (or a config.json for model.config)")
            elif offline(environ):
                require(
                    hf_config.hub_file(value, need, revision=m.revision) is not None,
                    f"model.{key}",
                    f"{value} is not in the local hub cache and HF_HUB_OFFLINE is set; download it first (huggingface-cli download {value}) or unset HF_HUB_OFFLINE",
                )
    if not d.is_text:
        return
    if d.packing:
        require(
            m.attn_implementation in PACKING_ATTN,
            "data.packing",
            f"model.attn_implementation={m.attn_implementation} cannot keep packed samples from attending to each other; use one of {', '.join(PACKING_ATTN)}, or data.packing=false",
        )
    tokenizer = hf_config.source_folder(m.tokenizer_source, revision=m.revision)
    if d.format == "messages" and not d.chat_template and tokenizer is not None:
        require(
            hf_config.has_chat_template(tokenizer) is not False,
            "data.chat_template",
            f"the tokenizer {m.tokenizer_source} has no chat template and data.format=messages needs one; set data.chat_template (Jinja) or data.format=prompt_completion",
        )
    if d.name != "jsonl":
        return
    from launcher.tokenize_step import text_spec

    spec = text_spec(cfg)
    for key in ("paths", "validation_paths"):
        try:
            files = hf_config.data_files(spec, key)
        except ValueError as exc:
            raise ConfigError("", str(exc)) from None
        for f in files[:1]:
            try:
                fields = hf_config.record_fields(f)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"data.{key}", f"cannot read the first record of {f} ({' '.join(str(exc).split())}); give JSONL, JSON, CSV or Parquet records") from None
            for field_key in needed_fields(d.format, d.input_field):
                name = getattr(d, field_key)
                extra = " (or data.input_field='' when there is none)" if field_key == "input_field" else ""
                require(name in fields, f"data.{field_key}", f"{f} has no field '{name}' (its fields: {', '.join(fields) or 'none'}); set data.{field_key}{extra}")


def needed_fields(fmt: str, input_field: str) -> tuple[str, ...]:
    if fmt == "text":
        return ("text_field",)
    if fmt == "messages":
        return ("messages_field",)
    return ("prompt_field", "completion_field", *(("input_field",) if input_field else ()))


def is_checkpoint_folder(path: Path) -> bool:
    """A ringleader checkpoint: a folder with its completion marker (trainer/checkpoint.py)."""
    return path.is_dir() and (path / "COMPLETE").is_file()


def safetensors_error(path: Path) -> str | None:
    """Why `path` is not a safetensors file (8-byte header length, then a JSON header), or None.
    Reads the header only, without torch."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "too short to be a safetensors file"
            (length,) = struct.unpack("<Q", head)
            if length > min(path.stat().st_size - 8, 100 * 2**20):
                return "not a safetensors file (bad header length)"
            header = json.loads(f.read(length))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (ValueError, UnicodeDecodeError):
        return "not a safetensors file (its header is not JSON)"
    return None if isinstance(header, dict) else "not a safetensors file"


def check_hardware(cfg: RunConfig) -> None:
    """Checks against the hw profile (already resolved from the host when it was `auto`)."""
    hw, t, c = cfg.hw, cfg.train, cfg.cluster
    require(hw.accelerator in ("cpu", "cuda"), "hw.accelerator", f"'{hw.accelerator}' is not one of cpu, cuda")
    require(not t.bf16 or hw.bf16, "train.bf16", f"the hw profile {hw.name} has no bf16; set train.fp16=true instead, or pick another +hw")
    require(not t.fp16 or hw.accelerator == "cuda", "train.fp16", "fp16 needs CUDA GPUs; on CPU use train.bf16=true or fp32")
    require(t.tf32 is None or hw.accelerator == "cuda", "train.tf32", f"TF32 is a mode of CUDA GPUs' matmuls and convolutions; it does nothing on the CPU profile {hw.name}: drop train.tf32")
    require(t.ddp_backend != "nccl" or hw.accelerator == "cuda", "train.ddp_backend", "nccl needs CUDA GPUs; use gloo on CPU (or leave it empty)")
    bitsandbytes = cfg.optimizer.name in BITSANDBYTES
    require(not bitsandbytes or hw.accelerator == "cuda", "optimizer", f"{cfg.optimizer.name} (bitsandbytes) needs CUDA GPUs; use optimizer=adamw on CPU")
    require(not t.auto_find_batch_size or importlib.util.find_spec("accelerate") is not None, "train.auto_find_batch_size", "uses accelerate's find_executable_batch_size; pip install accelerate, or drop it")
    # Inductor (torch.compile's default backend) writes and builds C++ for the CPU (CXX, else g++).
    cpp = os.environ.get("CXX") or "g++"
    inductor_on_cpu = t.torch_compile and (t.torch_compile_backend or "inductor") == "inductor" and hw.accelerator == "cpu"
    require(not inductor_on_cpu or shutil.which(cpp) is not None, "train.torch_compile_backend", f"inductor builds C++ on the CPU and {cpp} is not found; install a C++ compiler (or set CXX), or set train.torch_compile_backend=aot_eager")
    if cfg.peft.method == "qlora":  # bitsandbytes' 4-bit weights compute on CUDA GPUs only
        require(hw.accelerator == "cuda", "peft.method", f"qlora loads the base in 4 bits with bitsandbytes, which needs CUDA GPUs (hw profile {hw.name} is {hw.accelerator}); use peft=lora on CPU")
        require(importlib.util.find_spec("bitsandbytes") is not None, "peft.method", "qlora needs bitsandbytes; pip install bitsandbytes, or use peft=lora")
        require(cfg.peft.bnb_4bit_compute_dtype != "bfloat16" or hw.bf16, "peft.bnb_4bit_compute_dtype", f"the hw profile {hw.name} has no bf16; set peft.bnb_4bit_compute_dtype=float16")
    if hw.accelerator == "cuda":
        require(hw.gpus_per_node >= 1, "hw.gpus_per_node", f"a cuda profile needs GPUs, got {hw.gpus_per_node}")
        require(
            c.nproc_per_node <= hw.gpus_per_node,
            "cluster.nproc_per_node",
            f"{c.nproc_per_node} processes but {hw.gpus_per_node} GPUs per node; set cluster.nproc_per_node<={hw.gpus_per_node}",
        )


def check_not_foreign(run_dir: Path) -> None:
    """A run directory is ringleader's (plan.json), or new, or empty: `train.output_dir=.` in a
    project folder would overwrite its config.yaml and fill it with logs."""
    if run_dir.is_dir() and not (run_dir / "plan.json").is_file():
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in BEFORE_A_RUN)
        if foreign:
            raise ConfigError("train.output_dir", f"{run_dir} holds files that are not a ringleader run (e.g. {foreign[0]}; no plan.json); choose a new or empty folder")


def check_writable(folder: Path, key: str) -> None:
    """The run can create `folder` (or write into it): a one-line error now, not a traceback after
    the plan was printed. Looks only; creates nothing."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(key, f"{folder} exists and is not a folder; choose another {key}")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"{folder} would be inside {existing}, which is a file; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK) or read_only_filesystem(existing) or existing.is_relative_to("/proc") or existing.is_relative_to("/sys"):
        raise ConfigError(key, f"cannot write in {existing} (permission denied or read-only); choose another {key}")


def read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return True
