"""Peak GPU memory of each training rank, for benchmarks/gpu_check, without touching the trainer.

The trainer records no peak memory (neither metrics.jsonl nor result.json), so gpu_check puts
this folder first on PYTHONPATH of the runs it starts: Python imports `sitecustomize` at start-up
in every process (launcher, torchrun agent, ranks). Only where RINGLEADER_GPU_PROBE_DIR is set,
and only in a process that used CUDA, it writes torch.cuda.max_memory_allocated() at exit. It
imports nothing heavy: the launcher must stay torch-free, and it stays so.
A rank killed with SIGKILL writes nothing (atexit does not run).
"""

import atexit
import json
import os
import sys


def _write_peak() -> None:
    torch = sys.modules.get("torch")  # never imported here: only a process that used it counts
    folder = os.environ.get("RINGLEADER_GPU_PROBE_DIR")
    if torch is None or not folder:
        return
    try:
        if not torch.cuda.is_initialized():
            return
        device = torch.cuda.current_device()
        record = {
            "pid": os.getpid(),
            "rank": int(os.environ.get("RANK", "0")),
            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "device": torch.cuda.get_device_name(device),
            "max_memory_allocated": torch.cuda.max_memory_allocated(device),
            "max_memory_reserved": torch.cuda.max_memory_reserved(device),
        }
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"peak-{os.getpid()}.json"), "w") as f:
            json.dump(record, f)
    except Exception as exc:  # a probe must never change how a run ends
        print(f"gpu_check probe: {type(exc).__name__}: {exc}", file=sys.stderr)


def _chain_to_the_shadowed_sitecustomize() -> None:
    """This file hides any sitecustomize further down sys.path (Debian's Python ships one): run it."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if os.environ.get("RINGLEADER_GPU_PROBE_DIR"):
    atexit.register(_write_peak)  # registered first, so it runs last, after the trainer's own
_chain_to_the_shadowed_sitecustomize()
