"""ringleader's launcher: compose the config, validate it, plan the run, write the run directory,
hand the plan to a backend. It never imports torch, deepspeed or accelerate."""
