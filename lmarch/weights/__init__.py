"""Weights on disk: safetensors, Hugging Face layouts (one name map per family), checkpoints."""
