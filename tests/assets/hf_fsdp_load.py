"""Run by tests/test_hf_model.py under torchrun (2 gloo ranks): build a transformers model on the
meta device, shard it with FSDP2 per decoder layer, materialise, stream rank 0's safetensors into
the shards; then the logits must equal the unsharded model's. Writes rank N's result to OUT/rank-N.json.

    torchrun --nproc_per_node=2 tests/assets/hf_fsdp_load.py MODEL_DIR OUT
"""

import json
import resource
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from trainer import hf_model

folder, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = hf_model.build_causal_lm(hf_model.HFModelSpec(name_or_path=folder), init="meta")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for block in hf_model.transformer_blocks(model):
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
hf_model.materialize(model, torch.device("cpu"))
hf_model.load_full_state_dict(model, folder if rank == 0 else None)
local = sum(p.to_local().numel() for p in model.parameters())  # before forward: all sharded
model.eval()
ids = torch.arange(3, 40).reshape(1, -1)
with torch.no_grad():
    logits = model(input_ids=ids).logits
result = {"logits_sum": float(logits.double().sum()), "logits_first": logits[0, :3, :5].tolist(), "local_params": local, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
with open(f"{out}/rank-{rank}.json", "w") as f:
    json.dump(result, f)
dist.destroy_process_group()
