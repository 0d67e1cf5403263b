"""Annotator backends behind one small interface (labeling.base), found by name with create_backend()."""
from labeling.base import ASKED_AGAIN_REASONS, AnnotatorBackend, PullReport, PushReport, TaskRequest, available_backends, create_backend, register_backend
from labeling import simulated  # noqa: F401  (registers "none" and "oracle")

try:  # Label Studio registers itself when its module is present
    from labeling import labelstudio_backend  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["ASKED_AGAIN_REASONS", "AnnotatorBackend", "PullReport", "PushReport", "TaskRequest", "available_backends", "create_backend", "register_backend"]
