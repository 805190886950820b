"""`python -m benchmarks.gpu_check`: every GPU path of ringleader, run for real through the
launcher on one CUDA GPU, recorded in benchmarks/results/gpu.json (issue 17).

    python -m benchmarks.gpu_check                  # all checks, within --budget-s (7.5 min)
    python -m benchmarks.gpu_check --only resume    # one check; merged into an existing gpu.json
    python -m benchmarks.gpu_check --dry-run        # print every launcher command, validate each
                                                    # with the launcher's dry_run=true (CPU is fine)

Each check is one or more real training runs (`python -m launcher +hw=1xH100
cluster.nproc_per_node=1 ...`, a few dozen steps), judged from what the run directory holds; the
checks and their verdicts are in checks.py. A failed check records its error's last lines and goes
on to the next; once the budget is spent the rest are "skipped: budget", and a run in progress is
cut. gpu.json is rewritten (atomically) after every check, so a killed run leaves what it had.
Without CUDA it refuses in one line, exit 2, before writing anything. Exit 1 if a check did not pass.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, env
from benchmarks.gpu_check.checks import CHECKS, Check, CheckFailed, Runs
from benchmarks.gpu_check.runner import Runner, command_line, detect_cuda, show, tail, write_json_atomically

RESULT = RESULTS / "gpu.json"
MIN_START_S = 20  # a check started with less budget than this could not finish a run


def error(message: str) -> int:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    return 2


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting checks, and cut the run in progress, after this many seconds (default 450)")
    p.add_argument("--only", metavar="NAME", help=f"run one check: {', '.join(c.name for c in CHECKS)}")
    p.add_argument("--dry-run", action="store_true", help="print and validate every check's launcher commands (launcher dry_run=true); runs no training")
    p.add_argument("--hw", default="1xH100", help="the hw profile the runs use (default 1xH100; its peak_tflops_bf16 is MFU's denominator)")
    p.add_argument("--keep", action="store_true", help="keep the run directories (their folder is printed)")
    return p.parse_args(argv)


def dry_run(checks: list[Check], hw: str) -> int:
    """Every launch of every check through the real launcher with dry_run=true: a typo in a key,
    a refused combination or a second rank fails here, on the CPU, not on the GPU's clock."""
    failures, seen = 0, set()
    with tempfile.TemporaryDirectory(prefix="gpu_check-dry-") as tmp:
        for check in checks:
            print(f"{check.name}: {check.what}" + ("" if check.launches else " [not built yet]"))
            for launch in check.launches:
                if launch.name in seen:  # a run shared with an earlier check (the DDP reference)
                    print(f"  --  {launch.name}: shared, checked above")
                    continue
                seen.add(launch.name)
                argv = command_line(launch, hw, Path(tmp) / launch.name, "dry_run=true")
                proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env(**launch.env), timeout=120)
                one_rank = "world size 1" in proc.stdout
                ok = proc.returncode == 0 and one_rank
                failures += not ok
                why = (proc.stderr.strip().splitlines() or ["no 'world size 1' in the plan: one rank per GPU is required"])[-1]
                print(f"  {'ok' if ok else 'FAILED'}  {show(argv[:-1], launch.env)}" + ("" if ok else f"\n        {why}"))
    print(f"gpu_check: dry run: {len(seen) - failures} launcher command(s) valid, {failures} refused")
    return 1 if failures else 0


def run_check(check: Check, runner: Runner) -> dict[str, Any]:
    """One check's entry in gpu.json: its status, wall time, figures, and the error's last lines."""
    fig: dict[str, Any] = {}
    before = set(runner.done)
    started = time.monotonic()
    entry: dict[str, Any] = {"what": check.what}
    try:
        assert check.judge is not None
        check.judge(Runs(check, runner.start), fig)
        entry["status"] = "passed"
    except CheckFailed as exc:
        entry.update(status="failed", error=str(exc))
    except Exception as exc:  # a broken judge or an unreadable run directory: recorded, and on
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}\n{tail(traceback.format_exc(), 8)}")
    entry.update(
        wall_s=round(time.monotonic() - started, 1),
        date=time.strftime("%Y-%m-%d %H:%M"),
        figures=fig,
        runs={name: runner.done[name].summary() for name in runner.done if name not in before},
    )
    shared = [launch.name for launch in check.launches if launch.name in before]
    if shared:
        entry["reused_runs"] = shared  # started for an earlier check; their time counted there
    return entry


def run_checks(checks: list[Check], *, hw: str, budget_s: float, gpu: dict[str, Any], merge: bool, keep: bool) -> int:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    runner = Runner(hw=hw, workdir=workdir, deadline=started + budget_s)
    document: dict[str, Any] = {
        "benchmark": "gpu_check",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "gpu": gpu,
        "hw_profile": hw,
        "budget_s": budget_s,
        "complete": False,
        "checks": {},
    }
    if merge and RESULT.exists():  # --only: the other checks keep their last results
        try:
            import json

            document["checks"] = json.loads(RESULT.read_text()).get("checks", {})
        except ValueError:
            pass
    for check in checks:
        document["checks"][check.name] = {"what": check.what, "status": "pending" if check.judge else "not built yet"}
    for check in checks:
        if check.judge is None:
            continue
        if started + budget_s - time.monotonic() < MIN_START_S:
            entry: dict[str, Any] = {"what": check.what, "status": "skipped: budget"}
        else:
            print(f"gpu_check: {check.name}: {check.what}", flush=True)
            entry = run_check(check, runner)
        document["checks"][check.name] = entry
        document["wall_s"] = round(time.monotonic() - started, 1)
        write_json_atomically(RESULT, document)
        print(f"gpu_check: {check.name}: {entry['status']}" + (f" ({entry['wall_s']} s)" if "wall_s" in entry else ""), flush=True)
        if entry["status"] == "failed":
            print("  " + "\n  ".join(entry["error"].splitlines()[-6:]), flush=True)
    statuses = [document["checks"][c.name]["status"] for c in checks]
    document["summary"] = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    document["complete"] = True
    document["wall_s"] = round(time.monotonic() - started, 1)
    write_json_atomically(RESULT, document)
    if keep:
        print(f"gpu_check: run directories kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"gpu_check: {document['summary']} in {document['wall_s']} s; {RESULT.relative_to(ROOT)}")
    return 0 if all(s in ("passed", "not built yet") for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    checks = list(CHECKS)
    if args.only:
        checks = [c for c in CHECKS if c.name == args.only]
        if not checks:
            return error(f"--only: no check named '{args.only}'; choose one of {', '.join(c.name for c in CHECKS)}")
    if args.budget_s <= 0:
        return error(f"--budget-s: must be > 0 seconds, got {args.budget_s:g}")
    if args.dry_run:
        return dry_run(checks, args.hw)
    gpu, why = detect_cuda()
    if gpu is None:
        return error(f"no CUDA GPU here ({why}); run it on a machine with one CUDA GPU")
    return run_checks(checks, hw=args.hw, budget_s=args.budget_s, gpu=gpu, merge=bool(args.only), keep=args.keep)


if __name__ == "__main__":
    raise SystemExit(main())
