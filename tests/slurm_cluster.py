"""A real two-node SLURM cluster on loopback, in one temporary folder: munged, slurmctld, two slurmd.

Debian's packages (slurmctld slurmd slurm-client munge; `tests/run.sh` installs them as root).
Both nodes are this host (NodeHostname=localhost), with 2 CPUs each, so a 2-node x 2-rank job fits.
Nothing is written outside the folder; every client finds the cluster through SLURM_CONF.
`python -m tests.slurm_cluster` starts one and keeps it up until Ctrl-C, for poking at by hand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel")


def missing_packages() -> list[str]:
    return [p for p in PACKAGES if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _free_ports(n: int) -> list[int]:
    """n free TCP ports, consecutive (slurmd's Port=a-b range needs that)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65000:
            continue
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return list(range(base, base + n))
    raise RuntimeError("no free ports for the SLURM daemons")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurmCluster:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="ringleader-slurm-"))
        self.conf = self.folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def write_config(self) -> None:
        d = self.folder
        for sub in ("state", "spool", "log", "run"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        ctld, n1, n2 = _free_ports(3)
        self.conf.write_text(f"""\
ClusterName=ringleader-test
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmdPort={n1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Short waits: a test cluster should stop jobs and answer quickly.
KillWait=10
MessageTimeout=10
InactiveLimit=0
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=n[1-2] NodeHostname=localhost Port={n1}-{n2} CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start(self, timeout: float = 30) -> "LocalSlurmCluster":
        d = self.folder
        self.write_config()
        subprocess.run(
            [_sbin("munged"), f"--key-file={d}/munge.key", f"--socket={d}/munge.sock", f"--pid-file={d}/run/munged.pid",
             f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge.seed", "--force"],
            check=True, env=self.env, capture_output=True,
        )
        subprocess.run([_sbin("slurmctld")], check=True, env=self.env, capture_output=True)
        for node in ("n1", "n2"):
            subprocess.run([_sbin("slurmd"), "-N", node], check=True, env=self.env, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t %D"], env=self.env, capture_output=True, text=True).stdout.split()
            if out[:2] == ["idle", "2"]:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM cluster did not come up; see {d}/log: {out}")

    def stop(self) -> None:
        d = self.folder
        for pid_file in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid", "munged.pid"):
            path = d / "run" / pid_file
            try:
                pid = int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} once the controller has forgotten it)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields: dict[str, str] = {}
        for item in out.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields


if __name__ == "__main__":
    cluster = LocalSlurmCluster().start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    finally:
        cluster.stop()
