"""Backends that start a plan (local torchrun, SLURM through submitit) and environment detection."""
