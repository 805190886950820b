"""report_to wandb and mlflow for real, with no network: wandb in offline mode (its .wandb
transaction log read back record by record with wandb's own protobuf messages) and MLflow on a
local file store read back through MlflowClient. The metrics equal metrics.jsonl, and a run that
crashes and resumes keeps logging to the same tracker run."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY, launcher_env, run_launcher
from trainer.trackers import STATE_FILE, TrackerError, Trackers, read_state, resolve_report_to, tracked

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


def tracker_env(tmp_path: Path) -> dict[str, str]:
    return {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "ringleader-test",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # a local store (its file store is deprecated)
        "MLFLOW_EXPERIMENT_NAME": "ringleader-test",
    }


# -- reading the trackers back -------------------------------------------------------------------


def wandb_records(path: Path):
    """The records of a .wandb file: W&B's LevelDB-log framing (a 7-byte file header, then 32 KiB
    blocks of chunks, each with a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST),
    each record one wandb_internal_pb2.Record. wandb 0.31 ships no Python reader (its Go core
    reads these), so the framing is read here and the messages with wandb's own protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left  # zero-filled tail of a block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_history(run_dir: Path) -> tuple[set[str], list[dict]]:
    """Every offline segment's run id, and the history rows of all of them in order of start."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    ids, rows = set(), []
    for f in files:
        for record in wandb_records(f):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                row = {}
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        row[key] = json.loads(item.value_json)
                rows.append(row)
    return ids, rows


def mlflow_history(run_id: str, uri: str) -> tuple[dict, Counter]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    got = Counter()
    for key in run.data.metrics:
        for m in client.get_metric_history(run_id, key):
            got[(key, m.step, m.value)] += 1
    return run, got


def expected(events: list[dict]) -> Counter:
    want = Counter()
    for event in events:
        for key, value in tracked(event).items():
            if "step" in event:
                want[(key, event["step"], float(value))] += 1
    return want


def wandb_as_counter(rows: list[dict]) -> Counter:
    got = Counter()
    for row in rows:
        step = row.pop("train/global_step")
        for key, value in row.items():
            got[(key, step, float(value))] += 1
    return got


# -- the trackers in one process -------------------------------------------------------------------


def test_report_to_accepts_trainer_forms_and_refuses_the_rest():
    assert resolve_report_to("wandb") == ["wandb"]
    assert resolve_report_to(["tensorboard", "mlflow"]) == ["tensorboard", "mlflow"]
    assert resolve_report_to("none") == [] and resolve_report_to([]) == []
    assert resolve_report_to("all") == ["tensorboard", "wandb", "mlflow"]  # both installed here
    for bad in ("comet_ml", ["none", "wandb"], ["tensorboard", "neptune"]):
        with pytest.raises(TrackerError):
            resolve_report_to(bad)


def test_trackers_continue_one_run_across_reopenings(tmp_path, monkeypatch):
    """Two openings of one run directory (a restart) write to one wandb run and one MLflow run,
    named by train.run_name, and hold exactly what was logged."""
    for key, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train:\n  run_name: my-finetune\n  seed: 3\n")
    events = [{"step": s, "epoch": s / 4, "loss": 2.0 / (s + 1), "learning_rate": 1e-3 * s, "time": 1.0} for s in range(1, 5)]
    events.insert(2, {"step": 2, "epoch": 0.5, "eval_loss": 1.25, "eval_samples": 16})
    events.append({"event": "resume", "step": 3, "checkpoint": "x"})  # no numbers: nothing tracked
    events += [{"step": s, "loss": 3.0 / (s + 1)} for s in (4, 5)]  # step 4 again, as after a resume

    import yaml

    from trainer.trackers import open_trackers

    first = open_trackers(run_dir, ["wandb", "mlflow", "tensorboard"])
    for e in events[:5]:
        first.log(e)
    first.close()
    state = read_state(run_dir)
    second = open_trackers(run_dir, "all")
    for e in events[5:]:
        second.log(e)
    second.close()
    assert read_state(run_dir) == state, "a reopening must not start new tracker runs"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["run_name"] == "my-finetune"

    ids, rows = wandb_history(run_dir)
    assert ids == {state["wandb"]["id"]}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2  # two segments of one run id
    assert wandb_as_counter(rows) == expected(events)

    run, got = mlflow_history(state["mlflow"]["run_id"], tracker_env(tmp_path)["MLFLOW_TRACKING_URI"])
    assert got == expected(events)
    assert run.info.run_name == "my-finetune" and run.info.status == "FINISHED"
    assert run.data.params["train.seed"] == "3"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracker_env(tmp_path)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("ringleader-test")
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_mlflow_default_store_is_pinned_to_the_run(tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI, MLflow's default store (mlflow.db in the working directory) is
    saved as an absolute URI: a restart from another directory continues the same run there."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ringleader-test")
    run_dir, first_cwd, second_cwd = tmp_path / "run", tmp_path / "a", tmp_path / "b"
    for d in (run_dir, first_cwd, second_cwd):
        d.mkdir()
    (run_dir / "config.yaml").write_text("train: {}\n")
    monkeypatch.chdir(first_cwd)
    first = Trackers(run_dir, ["mlflow"])
    first.log({"step": 1, "loss": 1.5})
    first.close()
    uri = read_state(run_dir)["mlflow"]["tracking_uri"]
    assert uri == f"sqlite:///{first_cwd / 'mlflow.db'}"
    monkeypatch.chdir(second_cwd)
    second = Trackers(run_dir, ["mlflow"])
    second.log({"step": 2, "loss": 0.5})
    second.close()
    assert not (second_cwd / "mlflow.db").exists()
    _, got = mlflow_history(read_state(run_dir)["mlflow"]["run_id"], uri)
    assert got == Counter({("train/loss", 1, 1.5): 1, ("train/loss", 2, 0.5): 1})


def test_tracker_imports_are_lazy(tmp_path):
    """Choosing only TensorBoard (or nothing) imports neither wandb nor mlflow."""
    code = (
        "import sys, pathlib; from trainer.trackers import open_trackers;"
        f"assert open_trackers(pathlib.Path({str(tmp_path)!r}), ['tensorboard']) is None;"
        "assert open_trackers(pathlib.Path('.'), 'none') is None;"
        "assert not {'wandb', 'mlflow'} & set(sys.modules), sorted(m for m in sys.modules if m in ('wandb', 'mlflow'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=launcher_env())


# -- a real 2-rank run that crashes and resumes ------------------------------------------------------


def test_two_rank_run_crashes_resumes_and_keeps_one_tracker_run(tmp_path):
    """Rank 1 SIGKILLs itself at step 10; rerunning the same command resumes from step-8. wandb
    (offline) and MLflow (file store) each hold one run, named by train.run_name, whose metrics
    equal metrics.jsonl line for line, steps 9 and 10 logged twice as metrics.jsonl has them.
    When the whole file runs, this process holds a wandb service from the tests above and the
    ranks inherit its WANDB_SERVICE: rank 0 must start its own (the crashed attempt's run would
    still be open in the shared one)."""
    run_dir = tmp_path / "run"
    overrides = [*TINY, "train.max_steps=12", "train.save_strategy=steps", "train.save_steps=4", "train.eval_strategy=steps", "train.eval_steps=4",
                 "train.report_to=[wandb,mlflow]", "train.run_name=resumed-twice"]
    env = tracker_env(tmp_path)
    crashed = run_launcher(run_dir, *overrides, env=launcher_env(RINGLEADER_FAULT="step:1:10", **env), check=False)
    assert crashed.code != 0
    state = read_state(run_dir)
    resumed = run_launcher(run_dir, *overrides, env=launcher_env(**env))
    assert resumed.result()["status"] == "completed"
    assert read_state(run_dir) == state
    log = (run_dir / "logs" / "rank-0.log").read_text()
    assert log.count(f"trackers: wandb {state['wandb']['id']}, mlflow {state['mlflow']['run_id']}") == 2

    events = resumed.metrics()
    assert [e["step"] for e in events if e.get("event") == "resume"] == [8]
    want = expected(events)
    assert sum(n for (k, step, _), n in want.items() if k == "train/loss" and step == 9) == 2

    run, got = mlflow_history(state["mlflow"]["run_id"], env["MLFLOW_TRACKING_URI"])
    assert got == want
    assert run.info.run_name == "resumed-twice" and run.info.status == "FINISHED"

    ids, rows = wandb_history(run_dir)
    assert ids == {state["wandb"]["id"]}
    assert wandb_as_counter(rows) == want
    assert all(math.isfinite(v) for (_, _, v) in want)
    assert (run_dir / STATE_FILE).exists()
