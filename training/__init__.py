"""Training of LoRA, QLoRA, prompt-tuning and prefix-tuning adapters."""
