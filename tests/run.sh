#!/usr/bin/env bash
# The whole test suite on a fresh machine: Python packages, SLURM's Debian packages (as root), pytest.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch: a CPU-only machine takes the pinned CPU build (a GPU machine keeps what it has or gets CUDA's).
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then "$PY" -m pip install -q torch; else "$PY" -m pip install -q "torch==2.13.0"; fi
fi
"$PY" -m pip install -q -e ".[test]"

# A real two-node SLURM cluster runs on loopback during the tests (tests/slurm_cluster.py).
if [ "$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

# Type hints of launcher/, cluster/ and trainer/ (settings in pyproject.toml), then the tests.
"$PY" -m mypy
exec "$PY" -m pytest -q "$@"
