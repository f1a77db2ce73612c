"""Flower ClientApp of fed_unlearn (local LoRA training, evaluation, queries)."""
