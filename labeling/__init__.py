"""Annotator backends behind one small interface (labeling.base), found by name with create_backend()."""
from labeling.base import ASKED_AGAIN_REASONS, AnnotatorBackend, PullReport, PushReport, TaskRequest, available_backends, create_backend, register_backend
from labeling import simulated  # noqa: F401  (registers "none" and "oracle")


@register_backend("labelstudio")
def _labelstudio(**options):  # noqa: ANN003, ANN202
    """Label Studio's backend, imported when first made: its SDK takes ~0.7 s to import, which every command (loop
    status included) paid. Importing labeling.labelstudio_backend registers the class itself under this name."""
    from labeling.labelstudio_backend import LabelStudioBackend

    return LabelStudioBackend(**options)


__all__ = ["ASKED_AGAIN_REASONS", "AnnotatorBackend", "PullReport", "PushReport", "TaskRequest", "available_backends", "create_backend", "register_backend"]
