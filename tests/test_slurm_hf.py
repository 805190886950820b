"""A transformers model on the real two-node SLURM cluster (tests/slurm_cluster.py): the shipped tiny
Llama on the shipped instruction set, 2 nodes x 1 rank. The launcher tokenizes once, before
submitting (no rank tokenizes inside a collective timeout); the requeued job's ranks read the same
cache entry, untouched; losses are finite and final/ loads with from_pretrained. Offline.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

from tests.conftest import launcher_env, run_launcher
from tests.slurm_cluster import LocalSlurmCluster, missing_packages
from tests.test_slurm import wait_for

pytestmark = pytest.mark.slurm

if missing_packages() and os.geteuid() != 0:
    pytest.skip(f"SLURM is not installed ({', '.join(missing_packages())}) and installing it needs root: bash tests/run.sh as root", allow_module_level=True)

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ARGS = (
    "model=llama_tiny", "data=stdlib_instruct", "data.seq_len=128", "train.per_device_train_batch_size=4", "train.logging_steps=1",
    "train.eval_strategy=no", "train.eval_on_start=false", "train.save_strategy=no", "train.max_steps=40", "optimizer.learning_rate=1e-3",
    "scheduler=constant", "+hw=cpu", "hw.cpus_per_node=1", "cluster=slurm", "cluster.nodes=2", "cluster.nproc_per_node=1", "cluster.rdzv_port=29621",
)


def events(run_dir: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except OSError:
        return []


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under the tokenized cache with its modification time (ns): a rewrite shows."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_hf_model_tokenizes_once_and_requeues_on_the_cache(slurm_cluster: LocalSlurmCluster, tmp_path: Path) -> None:
    cluster = slurm_cluster  # the session's (tests/conftest.py)
    cache = tmp_path / "cache"  # its own data.cache_dir: this run must tokenize
    env = launcher_env(SLURM_CONF=str(cluster.conf), **OFFLINE)
    run_dir = tmp_path / "run"
    run = run_launcher(run_dir, *ARGS, f"data.cache_dir={cache}", env=env, timeout=300)
    assert "submitted job" in run.output, run.output[-3000:]
    plan = run.plan()
    # Tokenized by the launcher before it submitted: the entry is complete before any rank exists.
    assert plan["tokenized"]["hit"] is False and plan["train_samples"] > 400
    entry = Path(plan["data_cache"])
    assert entry.parent == cache and (entry / "meta.json").is_file()
    before = snapshot(cache)
    job = json.loads((run_dir / "slurm.json").read_text())["job_id"]
    # USR2 as SLURM sends it before a time limit: checkpoint, requeue, resume on the same cache entry.
    wait_for("step 2", lambda: max((e.get("step", 0) for e in events(run_dir) if "loss" in e), default=0) >= 2, timeout=240)
    cluster.run("scancel", "--signal=USR2", job)
    wait_for("the requeue", lambda: cluster.job(job).get("Restarts") == "1" and cluster.job(job).get("JobState") == "PENDING", timeout=120)
    time.sleep(2)  # slurmd refuses a credential made in the second its previous one was revoked (tests/test_slurm.py)
    cluster.run("scontrol", "update", f"jobid={job}", "starttime=now")
    wait_for("the requeued job to end", lambda: cluster.job(job).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300)
    log = (run_dir / "logs" / f"slurm-{job}.log").read_text() if (run_dir / "logs" / f"slurm-{job}.log").exists() else ""
    assert cluster.job(job)["JobState"] == "COMPLETED", log[-3000:]
    result = run.result()
    assert result["status"] == "completed" and result["global_step"] == 40, result
    seen = events(run_dir)
    resumed = [e["step"] for e in seen if e.get("event") == "resume"]
    assert len(resumed) == 1 and 2 <= resumed[0] < 40, resumed  # stopped mid-run by the signal, resumed from its checkpoint
    losses = [e["loss"] for e in seen if "loss" in e]
    assert [e["step"] for e in seen if "loss" in e] == list(range(1, 41)) and all(math.isfinite(x) for x in losses), losses
    # The ranks before and after the requeue read the one entry; nothing was tokenized or rewritten.
    assert snapshot(cache) == before and [p.name for p in cache.iterdir() if p.is_dir() and (p / "meta.json").is_file()] == [entry.name]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert type(model).__name__ == "LlamaForCausalLM"
