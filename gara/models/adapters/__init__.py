"""Adapters on a frozen SAM encoder: LoRA, GaRA (gated-rank), Adaptformer, and the COBOT plug-in."""
