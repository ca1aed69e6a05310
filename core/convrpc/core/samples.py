"""Deterministic sample data for demos, tests and benchmarks (no files, no downloads)."""

from __future__ import annotations

import numpy as np

__all__ = ["EDGE_KERNEL", "structured_image"]

#: The vertical second-difference edge kernel of the kernel-fitting experiment.
EDGE_KERNEL = np.array([[0.0, -1.0, 0.0], [0.0, 2.0, 0.0], [0.0, -1.0, 0.0]])


def structured_image(size: int = 80) -> np.ndarray:
    """A (size, size) float64 grey image in [0, 1] standing in for a photograph.

    A ramp, flat shapes with straight, round and diagonal edges, and a zone plate whose rings hold
    every spatial frequency, so that any 3x3 kernel is identifiable from the image and its filtered
    copy (plain gradient descent recovers the edge kernel in about 700 steps at lr 0.5).
    """
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    img = 0.3 * xx + 0.2 * yy
    img[(yy > 0.1) & (yy < 0.35) & (xx > 0.12) & (xx < 0.48)] = 0.9
    img[(yy - 0.7) ** 2 + (xx - 0.25) ** 2 < 0.03] = 0.1
    img[(yy > 0.1) & (yy < 0.45) & (xx > 0.55) & (xx - 0.55 < yy - 0.1)] = 0.6
    r2 = (yy - 0.7) ** 2 + (xx - 0.72) ** 2
    ring = r2 < 0.06
    img[ring] = 0.5 + 0.4 * np.cos(250 * np.pi * r2[ring])
    return img
