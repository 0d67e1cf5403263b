"""Constants and the run summary shared by the Label Studio integration tests and their conftest."""
from __future__ import annotations

CLASSES = ["good", "scratch", "spot"]
DESCRIPTIONS = {"good": "no visible defect", "scratch": "a thin bright line", "spot": "a round dark stain"}
ANNOTATOR_A = "annotator-a@example.com"
ANNOTATOR_B = "annotator-b@example.com"
COLORS = {"good": (128, 128, 128), "scratch": (220, 40, 40), "spot": (40, 200, 40)}
TIMINGS: dict[str, str] = {}  # printed in the terminal summary
REPORT_LINES: list[str] = []


def report_line(line: str) -> None:
    """A line for the end-of-run summary (shown even when pytest captures output)."""
    REPORT_LINES.append(line)
