"""Dense training targets: where the visible Bragg spots of a simulated still fall on the network's input.

An image label says only "10 or more spots somewhere"; a map that marks every visible spot tells the
network which pixels made it so. That is the supervision a counting network (``spotcount``) learns
from, many times richer than one label per image, and it ties the network to the physics (a compact
bright spot over its local background) rather than to whatever else separates one simulator's hits
from its misses.

The map has one cell per ``stride`` x ``stride`` input pixels of :func:`dials_cnn.preprocess.prepare`
(margin included). Cell values: ``SPOT`` where a visible spot's centre falls, else ``BACKGROUND``,
also where a reflection lies just below the visibility criterion. There is no "don't care" band around
the criterion: with hard labels the network's cell probabilities are calibrated, so their sum is an
unbiased count. An ignore band for reflections at 0.8-1.0 of the photons they need let the network count
them half: LN84 misses with 2-3 visible spots came out at 3.5-4.0 spots, with hard labels at 2.5-3.0
(docs/classifier.md).
"""

import numpy as np

from dials_cnn.preprocess import input_region

BACKGROUND, SPOT = 0, 1
#: changes whenever the meaning of the maps changes, so that cached training data is not reused across it
TARGET_VERSION = 2


def native_pixels_per_input_pixel(params):
    """How many native detector pixels one input pixel spans, per side."""
    if params.pipeline == "ke2018":
        raise ValueError("spot targets need a beam-centred pipeline (native, block or binned), not ke2018")
    return params.bin * (params.pool if params.pipeline == "binned" else 1)


def spot_target_map(spots, beam_centre_px, params, margin, stride, visible="visible"):
    """The uint8 target map of one still's ``spots`` (the ``Still.spots`` dict of :mod:`dials_cnn.simulate`)
    for inputs prepared with ``params`` and ``margin``; its side is the input side / ``stride``.

    ``visible``: which spots are marked, ``"visible"`` (by their expected photons: the truth labels,
    what the default model is trained on) or ``"visible_in_image"`` (as the drawn image shows them)."""
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
    chosen = inside & np.asarray(spots[visible], dtype=bool)
    target[row[chosen], column[chosen]] = SPOT
    return target
