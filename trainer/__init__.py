"""The per-rank program: init, build, train, close. Submodules import torch; this file does not.
What the launcher shares with the ranks (schema, plan, corpus description) lives in launcher/'s
bottom layer (tests/test_architecture.py)."""
