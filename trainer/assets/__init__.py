"""Files that ship with ringleader: the tiny Llama's tokenizer and config (trainer/assets/llama_tiny)."""
