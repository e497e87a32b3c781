"""The model: a timm ViT with peft LoRA, its trainable state, and per-client LoRA ranks."""
