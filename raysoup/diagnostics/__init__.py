"""Why a soup works: interpolation curves, angles between fine-tuned deltas and the
accuracy landscape of a sweep's checkpoints (``raysoup diagnose``).

``geometry`` is the pure maths; ``diagnose`` reads a sweep and writes the ``diagnostics``
Parquet dataset.
"""
