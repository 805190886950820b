"""The per-rank program: init, build, train, close. Submodules import torch; this file does not,
so the launcher may use the torch-free ones (corpus)."""
