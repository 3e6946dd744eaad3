"""Hot pixels, found from the run itself and masked before classification.

A hot (stuck, or unmasked warm) pixel is among the brightest pixels of nearly every image; a Bragg spot
falls on a given pixel in few images of a run of randomly oriented crystals. The network cannot tell a
hot pixel from a one-pixel CSPAD spot in one image: each unmasked hot pixel in the expert's window
counts as ~0.8 of a spot (measured on simulated blank L498, LO19 and LN84 stills with the default model:
5 hot pixels raise P(HIT) + P(MAYBE) from ~0.1 to ~0.9), so a detector with a handful of them would turn
every blank into a hit. Cheetah and OnDA build such masks from the run in the same way.

The mask is found per detector (panel names and sizes) on up to ``sample`` images spread over the
run: a pixel is hot if its excess over its neighbours is among the highest ``top_fraction`` of the
image in at least ``min_fraction`` of the sampled images. The excess, not the value: the brightest
pixels of a smooth background (near the beam stop, a water ring) are the same in every image too.
"""

import math

import numpy as np

#: fewer sampled images than this say nothing reliable about which pixels are always bright
MIN_IMAGES = 10


def detector_key(detector):
    """Images whose detectors share panel names and sizes share one hot-pixel mask."""
    return tuple((panel.get_name(), tuple(panel.get_image_size())) for panel in detector)


def spread_sample(n, sample):
    """Up to ``sample`` positions evenly spread over ``range(n)``."""
    if n <= sample:
        return list(range(n))
    return sorted({int(round(k * (n - 1) / (sample - 1))) for k in range(sample)})


def excess_over_neighbours(values, ok):
    """A pixel's value minus the mean of its trusted 4-neighbours (-inf where it is untrusted or
    has none): smooth backgrounds and gradients cancel, a lone bright pixel does not."""
    w = ok.astype(np.float32)
    v = values.astype(np.float32)
    v *= w
    total, count = np.zeros_like(v), np.zeros_like(w)
    for target, source in ((total, v), (count, w)):  # the 4 neighbours; none outside the panel
        target[1:] += source[:-1]
        target[:-1] += source[1:]
        target[:, 1:] += source[:, :-1]
        target[:, :-1] += source[:, 1:]
    np.maximum(count, 1.0, out=w)
    total /= w
    v -= total
    np.copyto(v, -np.inf, where=~ok | (count == 0))
    return v


def bright_pixels(flat, top_fraction):
    """Bool array: the valid pixels of a :class:`~dials_cnn.projection.FlatImage` whose excess over
    their neighbours is above the image's (1 - top_fraction) quantile."""
    excess = excess_over_neighbours(flat.data, flat.mask)
    # the quantile from every 7th pixel: the same threshold to a few per cent, 7x less sorting
    pooled = excess.ravel()[::7]
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return np.zeros(excess.shape, bool)
    rank = max(0, pooled.size - max(1, int(pooled.size * top_fraction)))
    return excess > np.partition(pooled, rank)[rank]


def sampled_bright_pixels(unit, read_flat, top_fraction=0.002):
    """(bright pixels of the part of ``unit``'s image read, (y0, y1, x0, x1) of it on the flat grid, the
    grid's shape), or None if the image cannot be read (the classification reports it)."""
    try:
        flat, place, shape = read_flat(unit)
        return bright_pixels(flat, top_fraction), place, shape
    except Exception:
        return None


def find_hot_pixels(units, read_flat, sample=20, top_fraction=0.002, min_fraction=0.5, look=None):
    """Hot pixels of the units of :func:`dials_cnn.classify.image_units`, per detector looked at: {detector
    key: bool array over the flat grid, True where a pixel is hot}, and a list of one-line reports.

    ``read_flat(unit)`` gives (FlatImage, (y0, y1, x0, x1) of it on the flat grid, the grid's shape):
    the part of the image the network sees, read as the classification reads it. A detector with
    fewer than :data:`MIN_IMAGES` readable images is left as it is (reported). ``look(sampled units)``
    gives :func:`sampled_bright_pixels` of each (default: one after the other, here)."""
    if look is None:
        def look(sampled):
            return [sampled_bright_pixels(unit, read_flat, top_fraction) for unit in sampled]
    by_detector = {}
    for position, unit in enumerate(units):
        key = detector_key(unit.imageset.get_detector(unit.position))
        by_detector.setdefault(key, []).append(position)
    masks, reports = {}, []
    for key, positions in by_detector.items():
        name = key[0][0] or "detector"
        if len(positions) < MIN_IMAGES:
            reports.append(f"hot pixels: {name}: {len(positions)} image(s), fewer than {MIN_IMAGES}; none masked")
            continue
        counts, used = None, 0
        for result in look([units[positions[k]] for k in spread_sample(len(positions), sample)]):
            if result is None:
                continue
            bright, (y0, y1, x0, x1), shape = result
            counts = np.zeros(shape, np.int32) if counts is None else counts
            counts[y0:y1, x0:x1] += bright
            used += 1
        if used < MIN_IMAGES:
            reports.append(f"hot pixels: {name}: only {used} readable sampled image(s); none masked")
            continue
        needed = max(3, math.ceil(min_fraction * used))
        hot = counts >= needed
        n_hot = int(hot.sum())
        masks[key] = hot  # also when empty: this detector has been looked at
        reports.append(f"hot pixels: {name}: {n_hot} masked (above their neighbours among the brightest "
                       f"{100 * top_fraction:g} % in >= {needed} of {used} sampled images)")
    return masks, reports


def mask_hot_pixels(flat, hot, place):
    """Mask (in place) the ``hot`` pixels (bool over the flat grid) of ``flat``, which lies at ``place``
    = (y0, y1, x0, x1) on that grid."""
    if hot is None:
        return
    y0, y1, x0, x1 = place
    cut = hot[y0:y1, x0:x1]
    flat.data[cut] = 0.0  # what the projection writes for any pixel that is not valid
    flat.mask[cut] = False
