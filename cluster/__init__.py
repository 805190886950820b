"""Backends that start a plan (cluster/backend.py: local torchrun, SLURM with ringleader's own sbatch
script) and environment detection (cluster/environment.py)."""
