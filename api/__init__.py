"""defect-loop: api."""
