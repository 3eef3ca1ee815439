"""Adapters on frozen Linear layers: LoRA and GaRA (gated-rank adaptation)."""
