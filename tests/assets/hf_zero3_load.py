"""Run by tests/test_hf_load.py under torchrun (2 gloo ranks): load pretrained weights under ZeRO-3
through ringleader's path (trainer/build.py zero3_pretrained) for each case named on the command
line, gather every parameter, and let rank 0 write the full state dict (OUT/CASE.safetensors)
with what it saw (OUT/CASE.json: which loader ran, tying, partitioning, dtype).

    torchrun --nproc_per_node=2 tests/assets/hf_zero3_load.py OUT CASE=FOLDER:DTYPE ...
"""

import json
import logging
import sys

import torch
import torch.distributed as dist

from launcher.deepspeed_config import deepspeed_config
from launcher.schema import RunConfig
from trainer.build import zero3_pretrained
from trainer.hf_model import HFModelSpec

out = sys.argv[1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
said: list[str] = []


class Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        said.append(record.getMessage())


logging.getLogger("ringleader").addHandler(Keep())
logging.getLogger("ringleader").setLevel(logging.INFO)

import deepspeed  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

for case in sys.argv[2:]:
    name, _, rest = case.partition("=")
    folder, _, dtype = rest.rpartition(":")
    cfg = RunConfig()
    cfg.strategy.name = "zero3"
    cfg.train.bf16 = dtype == "bfloat16"
    said.clear()
    model = zero3_pretrained(HFModelSpec(name_or_path=folder, dtype=dtype), deepspeed_config(cfg, world_size=world))
    params = list(model.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    with deepspeed.zero.GatheredParameters(params):
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if rank == 0:
        save_file(state, f"{out}/{name}.safetensors")
        info = {
            "fallback": any("transformers' ZeRO-3 from_pretrained loads it" in m for m in said), "said": said,
            "tied": model.lm_head.weight is model.model.embed_tokens.weight, "local": local, "total": sum(p.ds_numel for p in params),
            "dtype": str(params[0].dtype), "config_dtype": str(model.config.dtype), "training": model.training, "name_or_path": model.name_or_path,
            "inv_freq_dtype": str(model.model.rotary_emb.inv_freq.dtype),
        }
        with open(f"{out}/{name}.json", "w") as f:
            json.dump(info, f)
    del model, params, state
dist.barrier()
dist.destroy_process_group()
