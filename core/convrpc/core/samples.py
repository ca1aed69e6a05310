"""Deterministic sample data for demos, tests and benchmarks (no files, no downloads)."""

from __future__ import annotations

import numpy as np

__all__ = ["EDGE_KERNEL", "structured_image"]

#: The vertical second-difference edge kernel of the kernel-fitting experiment.
EDGE_KERNEL = np.array([[0.0, -1.0, 0.0], [0.0, 2.0, 0.0], [0.0, -1.0, 0.0]])


def structured_image(size: int = 80, seed: int = 0) -> np.ndarray:
    """A (size, size) float64 grey image in [0, 1] with edges, stripes, a disc and fine texture.

    Stands in for a photograph: it has flat regions, sharp edges in both directions and enough
    high-frequency detail that every 3x3 kernel is identifiable from its convolution.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = 0.35 + 0.25 * np.sin(2 * np.pi * (3 * x + 2 * y)) * np.cos(2 * np.pi * 5 * y)
    img += 0.3 * ((x - 0.62) ** 2 + (y - 0.38) ** 2 < 0.05)  # a bright disc
    img -= 0.25 * ((x > 0.1) & (x < 0.4) & (y > 0.55) & (y < 0.9))  # a dark block
    img += 0.15 * ((np.arange(size)[None, :] // 3) % 2)  # vertical stripes
    img += 0.3 * rng.standard_normal((size, size))  # sensor-like texture: makes every 3x3 kernel identifiable
    img -= img.min()
    return img / img.max()
