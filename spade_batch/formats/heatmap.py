"""The heat-map picture of an anomaly map: one colour scale for every overlay the product draws
(written overlays, the run report's and evaluate's examples). Needs matplotlib's colormaps only, not its figures.

The scale: `colour_range` picks the map values drawn as no colour (low) and full colour (high) from the
pixel threshold, `overlay` maps values onto jet between them.
"""

from __future__ import annotations

import matplotlib
import numpy as np


def colour_range(pixel_threshold: float | None, peak: float, low: float = 0.0) -> tuple[float, float]:
    """(low, high) of the colour scale: the pixel threshold at mid-scale, high = 2 * threshold - low.

    Without a threshold, high is `peak` (the largest map value shown). low is 0 for a scoring run's
    pictures; evaluate, which knows the normal pixels, starts at the median normal pixel score. high is
    always above low (by 1e-12, relative), so a flat map still draws.
    """
    high = 2 * pixel_threshold - low if pixel_threshold is not None else peak
    return low, max(high, low + 1e-12 * max(1.0, abs(low)))


def overlay(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, alpha: float = 0.5) -> np.ndarray:
    """Jet heat map blended over the image.

    image: H x W x 3 uint8; anomaly_map: H x W float, normalised to [0, 1] over [low, high] and clipped.
    Each pixel is blended with weight alpha * normalised score, so pixels at or
    below `low` keep the image unchanged and pixels at `high` get weight alpha.
    Returns H x W x 3 uint8.
    """
    image = np.asarray(image)
    anomaly_map = np.asarray(anomaly_map)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8, got shape {image.shape} dtype {image.dtype}")
    if anomaly_map.shape != image.shape[:2]:
        raise ValueError(f"anomaly_map must be H x W = {image.shape[:2]}, got {anomaly_map.shape}")
    if not low < high:
        raise ValueError(f"overlay needs low < high, got low={low}, high={high}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    level = np.clip((anomaly_map.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    heat = matplotlib.colormaps["jet"](level)[..., :3] * 255.0
    weight = alpha * level[..., None]
    blended = (1.0 - weight) * image + weight * heat
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
