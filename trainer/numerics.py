"""What the train.* numerics switches set in torch on each rank: tf32, and full determinism as
transformers' enable_full_determinism (its environment comes from the plan: launcher/options.py
DETERMINISM_ENV)."""

from __future__ import annotations

import logging
import importlib.util
import random

import torch

from launcher.schema import TrainConfig

log = logging.getLogger("ringleader")


def apply_numerics(t: TrainConfig) -> None:
    """train.tf32 (None: torch's defaults) and train.full_determinism, before the model is built."""
    if t.tf32 is not None:  # Trainer's enable_tf32: CUDA matmuls and cuDNN convolutions
        torch.backends.cuda.matmul.allow_tf32 = t.tf32
        torch.backends.cudnn.allow_tf32 = t.tf32
        log.info("tf32 %s for CUDA matmuls and cuDNN", "on" if t.tf32 else "off")
    if t.full_determinism:
        random.seed(t.seed)
        if importlib.util.find_spec("numpy") is not None:  # not a dependency; seeded where installed, as transformers' set_seed
            import numpy

            numpy.random.seed(t.seed % 2**32)
        torch.manual_seed(t.seed)  # all devices
        torch.use_deterministic_algorithms(True)  # an op without a deterministic kernel raises
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        log.info("full determinism: deterministic algorithms only, cuDNN deterministic, seeds %d", t.seed)
