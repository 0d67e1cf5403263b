"""Errors callers are expected to catch and explain (kept free of heavy imports so a CLI can import them fast)."""


class WeightsUnavailable(RuntimeError):
    """No pretrained weights could be had: say how to get some instead of silently training from noise."""
