"""GPU truth (issue 17): every path only a GPU can run, through the real launcher, one rank per GPU.

`python -m benchmarks.gpu_check` (see __main__.py); the checks and how each is judged: checks.py;
starting the runs, cutting them at the budget, measuring memory: runner.py; probe/sitecustomize.py
records each rank's torch.cuda.max_memory_allocated, which the trainer does not log.
"""
