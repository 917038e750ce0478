"""Attacks on a model's inputs (adversarial examples). Taught in chapter ``01_adversarial_examples``."""

from __future__ import annotations

__all__: list[str] = []
