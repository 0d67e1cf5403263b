"""defect-loop: labeling."""
