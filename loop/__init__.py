"""defect-loop: loop."""
