"""Every list of names a config value must come from, defined once: schema checks, planner, backends
and trainer all read them here. Imports nothing."""

from __future__ import annotations

# optimizer.name (TrainingArguments' `optim`). adamw is ringleader's historical name for adamw_torch.
ADAMW = ("adamw", "adamw_torch", "adamw_torch_fused")
BITSANDBYTES = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")  # CUDA only
OPTIMIZERS = (*ADAMW, "sgd", "adafactor", *BITSANDBYTES)
# scheduler.name (TrainingArguments' `lr_scheduler_type`), as trainer/optim.py builds them.
SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt",
    "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)
# strategy.name, and the ZeRO stage of each DeepSpeed one.
ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
STRATEGIES = ("ddp", "fsdp", *ZERO_STAGES)
# data.name of the datasets ringleader ships (a user's own sets data._target_).
DATASETS = ("pystdlib", "text_files", "tokens_bin", "synthetic", "jsonl", "hf", "stdlib_instruct")
# Records tokenized by the launcher's pre-step (trainer/tokenized.py) for a transformers model.
TEXT_DATASETS = ("jsonl", "hf", "stdlib_instruct")
DATA_FORMATS = ("text", "prompt_completion", "messages")
BYTE_LEVEL_DATASETS = ("pystdlib", "text_files")
TOKEN_BYTES = {"uint8": 1, "uint16": 2, "int32": 4}  # data.token_dtype -> bytes per token
PRECISIONS = ("fp32", "bf16", "fp16")
ACCELERATORS = ("cpu", "cuda")
DDP_BACKENDS = ("gloo", "nccl")
CLUSTERS = ("local", "slurm")  # cluster.name; cluster/backend.py BACKENDS maps each to its backend
CONTAINER_RUNTIMES = ("pyxis", "apptainer")
INTERVALS = ("no", "steps", "epoch")  # eval_strategy
SAVE_STRATEGIES = (*INTERVALS, "best")  # save_strategy; best: after an evaluation that improved the metric
# train.include_num_input_tokens_seen (Trainer's): no, all (every input token, padding included),
# non_padding (attention_mask's ones); Trainer's booleans true/false mean all/no.
TOKENS_SEEN = ("no", "all", "non_padding")
NONFINITE = ("error", "skip")
# What evaluation produces, so what metric_for_best_model may name (early stopping and best-model
# tracking would silently never fire on a metric that never appears).
# eval_perplexity: exp(eval_loss); eval_accuracy: next-token accuracy over the labelled tokens (needs
# logits: trainer/model_io.py). A user's train.compute_metrics adds its own names.
EVAL_METRICS = ("eval_loss", "eval_perplexity", "eval_accuracy")
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")  # greater_is_better unset: minimise these
# train.report_to trackers ringleader really writes to (also: all, none); anything else is refused.
TRACKERS = ("tensorboard", "wandb", "mlflow")
GPT_TARGET = "trainer.model.GPT"  # the built-in model, whose fields the schema checks
HF_TARGET = "transformers.AutoModelForCausalLM"  # a transformers causal LM (trainer/hf_model.py)
HF_DTYPES = ("float32", "bfloat16", "float16")  # model.dtype: the weights' dtype as loaded
# model.attn_implementation values transformers knows; those that isolate packed samples.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
PACKING_ATTN = ATTN_IMPLEMENTATIONS
# peft.method: no adapter (full training), LoRA through peft, QLoRA (LoRA on a 4-bit bitsandbytes base).
PEFT_METHODS = ("none", "lora", "qlora")
LORA_BIAS = ("none", "all", "lora_only")  # peft's LoraConfig.bias
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes' bnb_4bit_quant_type
BNB_4BIT_DTYPES = ("float32", "bfloat16", "float16")  # bnb_4bit_compute_dtype
BNB_4BIT_STORAGE = ("uint8", *BNB_4BIT_DTYPES)  # bnb_4bit_quant_storage: packed 4-bit weights held as this dtype
