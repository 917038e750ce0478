"""Attacks on client updates (Byzantine clients). Taught in chapter ``03_byzantine_threats``."""

from __future__ import annotations

__all__: list[str] = []
