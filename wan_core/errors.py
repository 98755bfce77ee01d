"""Errors every layer of wan_core raises; the lowest module, imported by all others."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says why and what to do instead."""
