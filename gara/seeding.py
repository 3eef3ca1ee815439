"""Stable seeds: the same inputs give the same random numbers in every process and run."""

from __future__ import annotations

import hashlib

import numpy as np


def derive_seed(*parts: object) -> int:
    """A stable 64-bit seed from any printable parts (SHA-256; unlike ``hash()``, not salted)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def seeded_rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))
