"""Experiment trackers beyond TensorBoard (Weights & Biases, MLflow), on rank 0 only: one tracker
run per run directory, continued across restarts, requeues and resumes.

`train.report_to` is Trainer's: a name or a list of `tensorboard`, `wandb`, `mlflow`, or `all`
(every one of them that is installed, as Trainer) or `none`. TensorBoard stays in
trainer/metrics.py; this module holds the two that keep a run on a server.

One tracker run per run directory: the run's tracker ids live in <run_dir>/trackers.json, written
atomically before the tracker is first told about them (wandb takes an id we choose; MLflow makes
its own, saved the moment it exists). A restart reads the file and continues that run: wandb with
`resume="allow"`, MLflow by logging to the saved run id. The file is ringleader's, kept with the
run; a fresh start with overwrite_output_dir removes it with metrics.jsonl (launcher/rundir.py).

Each event of metrics.jsonl goes to every tracker with the same values and TensorBoard's names
(`train/loss`, `eval/loss`, ...), at its optimizer step. A resumed run logs again the steps after
its checkpoint, as metrics.jsonl does; both trackers keep both values (wandb is told to plot
against `train/global_step`, as Trainer does, so it does not drop a repeated step).

wandb and mlflow are imported only when chosen (MLflow's import alone takes ~3.5 s here).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any

from launcher.options import TrackerError, resolve_report_to  # noqa: F401  (checked by the schema too)

log = logging.getLogger("ringleader")

STATE_FILE = "trackers.json"


def tracked(event: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl event under TensorBoard's names (trainer/metrics.py)."""
    prefix = "eval" if any(k.startswith("eval_") for k in event) else "train"
    out: dict[str, float] = {}
    for key, value in event.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
            out[key.replace("eval_", "eval/", 1) if key.startswith("eval_") else f"{prefix}/{key}"] = value
    return out


def read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def write_state(run_dir: Path, state: dict[str, Any]) -> None:
    from launcher.files import atomic_write  # fsynced, then renamed: the id survives a crash

    atomic_write(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")


def flat_config(node: Any) -> dict[str, str]:
    """The config as MLflow parameters: dotted keys, values as strings (JSON where not a string)."""
    from launcher.trajectory import flatten

    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(node).items()}


class WandbTracker:
    """A wandb run with an id ringleader chose, resumed with resume="allow" (offline or online)."""

    name = "wandb"

    def __init__(self, run_dir: Path, state: dict[str, Any], *, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        mine = state.setdefault("wandb", {})
        project = os.environ.get("WANDB_PROJECT") or mine.get("project") or "ringleader"
        if not mine.get("id"):
            alphabet = string.ascii_lowercase + string.digits
            mine.update(id="".join(secrets.choice(alphabet) for _ in range(8)), project=project)
            write_state(run_dir, state)  # before wandb hears of it: a crash in between still resumes it
        # A service token inherited from whatever started the job (a notebook, a sweep driver, a
        # test process) would put this run in that process's wandb service, where a crashed
        # earlier attempt may still hold the run id ("run ID ... is in use"). Rank 0 starts its own.
        os.environ.pop("WANDB_SERVICE", None)
        self.run = wandb.init(
            id=mine["id"], resume="allow", project=mine["project"], name=run_name, dir=str(run_dir), config=config,
            settings=wandb.Settings(console="off"),  # ranks keep their own logs/rank-N.log
        )
        # As Trainer: plot against the optimizer step, which a resumed run logs again (wandb would
        # drop a `step=` that is not larger than its last one).
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "train/global_step": step})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run in MLFLOW_TRACKING_URI's store (MLflow's default, ./mlflow.db, when unset), under
    MLFLOW_EXPERIMENT_NAME (as Trainer) or `ringleader`; resumed by its saved run id."""

    name = "mlflow"

    def __init__(self, run_dir: Path, state: dict[str, Any], *, run_name: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunStatus
        from mlflow.tracking import MlflowClient

        from mlflow.tracking import get_tracking_uri

        # The store as an absolute URI (MLflow's default, sqlite mlflow.db, is relative to the
        # working directory): a restart from elsewhere still finds the run. A restart without
        # MLFLOW_TRACKING_URI continues in the store the run started in.
        mine = state.get("mlflow", {})
        env_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        uri = env_uri or mine.get("tracking_uri") or get_tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if mine.get("run_id") and mine.get("tracking_uri") == uri:
            self.run_id = mine["run_id"]
            self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        else:
            if mine.get("run_id"):
                log.warning("mlflow: MLFLOW_TRACKING_URI changed from %r to %r since this run started; starting a new MLflow run there", mine.get("tracking_uri"), uri)
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ringleader")
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
            run = self.client.create_run(experiment_id, run_name=run_name, tags={"ringleader.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            state["mlflow"] = {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": uri}
            write_state(run_dir, state)
            # The config once, when the run is made (MLflow refuses to change a logged parameter).
            params = [Param(k[:250], v[:6000]) for k, v in flat_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow's cap per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Trackers:
    """The chosen trackers of one rank-0 process. `log` takes metrics.jsonl's events as they are."""

    def __init__(self, run_dir: Path, names: list[str], *, run_name: str = "", config: dict[str, Any] | None = None) -> None:
        self.trackers: list[WandbTracker | MlflowTracker] = []
        started = time.perf_counter()
        state = read_state(run_dir)
        name = run_name or run_dir.resolve().name
        for tracker in (WandbTracker, MlflowTracker):
            if tracker.name in names:
                self.trackers.append(tracker(run_dir, state, run_name=name, config=config or {}))
        if self.trackers:
            ids = ", ".join(f"{t.name} {state[t.name].get('id') or state[t.name].get('run_id')}" for t in self.trackers)
            log.info("trackers: %s (run name %s), opened in %.2f s", ids, name, time.perf_counter() - started)

    def log(self, event: dict[str, Any]) -> None:
        values = tracked(event)
        if not values or "step" not in event:
            return
        for tracker in self.trackers:
            tracker.log(int(event["step"]), values)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(run_dir: Path, report_to: str | list[str] | None) -> Trackers | None:
    """Rank 0's trackers for this run directory (None when only TensorBoard or nothing is chosen).
    run_name and the config come from the run's own config.yaml."""
    names = [n for n in resolve_report_to(report_to) if n != "tensorboard"]
    if not names:
        return None
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    run_name = str((config.get("train") or {}).get("run_name") or "")
    return Trackers(run_dir, names, run_name=run_name, config=config)
