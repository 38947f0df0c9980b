"""Output-level invariance: every shift of a grid on every image (``grid``), the paper's
protocols (``protocols``), and their results."""
