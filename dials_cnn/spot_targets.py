"""Dense training targets: where the visible Bragg spots of a simulated still fall on the network's input.

An image label says only "10 or more spots somewhere"; a map that marks every visible spot tells the
network which pixels made it so. That is the supervision a counting network (``spotcount``) learns
from, many times richer than one label per image, and it ties the network to the physics (a compact
bright spot over its local background) rather than to whatever else separates one simulator's hits
from its misses.

The map has one cell per ``stride`` x ``stride`` input pixels of :func:`dials_cnn.preprocess.prepare`
(margin included). Cell values: ``SPOT`` where a visible spot's centre falls, ``IGNORE`` where a
reflection lies that carries light but is just below the visibility criterion (neither answer is
wrong there), else ``BACKGROUND``.
"""

import numpy as np

from dials_cnn.preprocess import input_region

BACKGROUND, SPOT, IGNORE = 0, 1, 255
#: reflections with at least this fraction of the photons they need to be visible are not background.
#: 0.5 left the network free to count the many faint reflections of large cells (LN84 misses with 2
#: visible spots counted as 4.6-8.2; with 0.8: 2.8-6.1, docs/classifier.md).
NEAR_VISIBLE_FRACTION = 0.8


def native_pixels_per_input_pixel(params):
    """How many native detector pixels one input pixel spans, per side."""
    if params.pipeline == "ke2018":
        raise ValueError("spot targets need a beam-centred pipeline (native, block or binned), not ke2018")
    return params.bin * (params.pool if params.pipeline == "binned" else 1)


def spot_target_map(spots, beam_centre_px, params, margin, stride):
    """The uint8 target map of one still's ``spots`` (the ``Still.spots`` dict of :mod:`dials_cnn.simulate`)
    for inputs prepared with ``params`` and ``margin``; its side is the input side / ``stride``."""
    scale = native_pixels_per_input_pixel(params) * stride
    top, left, side, _ = input_region(params, beam_centre_px, margin)
    cells = side // scale
    target = np.zeros((cells, cells), dtype=np.uint8)
    x, y = np.asarray(spots["x"], dtype=np.float64), np.asarray(spots["y"], dtype=np.float64)
    if x.size == 0:
        return target
    column = np.floor((x - left) / scale).astype(np.int64)
    row = np.floor((y - top) / scale).astype(np.int64)
    inside = (column >= 0) & (column < cells) & (row >= 0) & (row < cells)
    visible = np.asarray(spots["visible"], dtype=bool)
    near = np.asarray(spots["photons"]) >= NEAR_VISIBLE_FRACTION * np.asarray(spots["visibility_threshold"])
    ignored = inside & near & ~visible
    target[row[ignored], column[ignored]] = IGNORE
    chosen = inside & visible
    target[row[chosen], column[chosen]] = SPOT  # a visible spot wins over a faint neighbour in its cell
    return target
