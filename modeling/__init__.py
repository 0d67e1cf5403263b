"""defect-loop: modeling."""
