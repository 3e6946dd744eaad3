"""Training augmentation, each applied where it is physically right.

Photometric (:class:`PhotometricAugment`) acts on the counts, BEFORE LCN, because LCN is not linear
in them (its std floor of 1 makes a faint image look different from a bright one): intensity scaling
(detector gain / pulse energy), binomial thinning down to near-zero photon-counting backgrounds
(Pilatus/Eiger-like blanks that a model trained on integrating detectors has never seen), and an added
Poisson background (flat + a solvent-ring-like radial band) of random level.

Geometric (:class:`GeometricAugment`) acts on the normalised inputs AFTER LCN, per batch: a random crop
shifted up to ``max_shift`` pixels from the beam-centred one (the paper's +-120), flips and 90-degree
rotations. These commute with LCN up to the border, so they are applied to inputs precomputed once.
"""

import dataclasses

import numpy as np

from dials_cnn.projection import FlatImage


@dataclasses.dataclass
class PhotometricAugment:
    intensity_scale: tuple = (0.5, 2.0)  # log-uniform factor on the counts
    thinning_probability: float = 0.25  # chance to keep only a fraction of the photons
    thinning_fraction: tuple = (0.02, 0.5)
    background_probability: float = 0.5
    background_level: tuple = (0.0, 10.0)  # mean added counts per pixel at the band's peak
    ring_radius: tuple = (0.15, 0.6)  # fraction of the image half-size

    def apply(self, flat, rng):
        data = flat.data.astype(np.float32, copy=True)
        if self.thinning_probability and rng.random() < self.thinning_probability:
            fraction = rng.uniform(*self.thinning_fraction)
            data = rng.binomial(np.rint(data).astype(np.int64), fraction).astype(np.float32)
        if self.background_probability and rng.random() < self.background_probability:
            data += self._background(data.shape, flat.beam_centre_px, rng)
        low, high = np.log(self.intensity_scale)
        data *= np.float32(np.exp(rng.uniform(low, high)))
        data[~flat.mask] = 0
        return FlatImage(data, flat.mask, flat.beam_centre_px, flat.pixel_size_mm)

    def _background(self, shape, beam, rng):
        h, w = shape
        y = (np.arange(h, dtype=np.float32) + 0.5 - beam[1])[:, None]
        x = (np.arange(w, dtype=np.float32) + 0.5 - beam[0])[None, :]
        radius = np.sqrt(x * x + y * y) / (0.5 * max(h, w))
        centre = rng.uniform(*self.ring_radius)
        width = rng.uniform(0.03, 0.2)
        profile = rng.uniform(0.0, 0.5) + np.exp(-0.5 * ((radius - centre) / width) ** 2)
        level = rng.uniform(*self.background_level)
        return rng.poisson(level * profile).astype(np.float32)


@dataclasses.dataclass
class GeometricAugment:
    max_shift: int = 120
    flips: bool = True
    rot90: bool = True

    def crops(self, inputs, indices, crop, rng):
        """Random ``crop`` squares of ``inputs[indices]`` (N, S, S) as float32 (B, crop, crop)."""
        side = inputs.shape[-1]
        slack = (side - crop) // 2
        shift = min(self.max_shift, slack)
        out = np.empty((len(indices), crop, crop), dtype=np.float32)
        for k, i in enumerate(indices):
            dy, dx = rng.integers(-shift, shift + 1, size=2) if shift > 0 else (0, 0)
            patch = inputs[i, slack + dy : slack + dy + crop, slack + dx : slack + dx + crop]
            if self.flips and rng.random() < 0.5:
                patch = patch[:, ::-1]
            if self.rot90:
                patch = np.rot90(patch, int(rng.integers(4)))
            out[k] = patch
        return out

    def crops_with_maps(self, inputs, maps, window, indices, crop, stride, rng):
        """Random crops as :meth:`crops`, with the same shifts (multiples of ``stride``), flips and
        rotations applied to the images' spot maps (N, S/stride, S/stride) and to the beam-centred
        ``window`` mask (S/stride, S/stride). Returns float32 crops, uint8 maps, float32 windows."""
        side = inputs.shape[-1]
        slack = (side - crop) // 2
        steps = min(self.max_shift, slack) // stride
        cells, slack_cells = crop // stride, slack // stride
        out = np.empty((len(indices), crop, crop), dtype=np.float32)
        out_maps = np.empty((len(indices), cells, cells), dtype=np.uint8)
        out_windows = np.empty((len(indices), cells, cells), dtype=np.float32)
        for k, i in enumerate(indices):
            cy, cx = rng.integers(-steps, steps + 1, size=2) if steps > 0 else (0, 0)
            y, x = slack + cy * stride, slack + cx * stride
            patch = inputs[i, y : y + crop, x : x + crop]
            y, x = slack_cells + cy, slack_cells + cx
            spot_map = maps[i, y : y + cells, x : x + cells]
            mask = window[y : y + cells, x : x + cells]
            if self.flips and rng.random() < 0.5:
                patch, spot_map, mask = patch[:, ::-1], spot_map[:, ::-1], mask[:, ::-1]
            if self.rot90:
                turns = int(rng.integers(4))
                patch, spot_map, mask = np.rot90(patch, turns), np.rot90(spot_map, turns), np.rot90(mask, turns)
            out[k], out_maps[k], out_windows[k] = patch, spot_map, mask
        return out, out_maps, out_windows


def centre_crops(inputs, indices, crop):
    """The beam-centred ``crop`` squares of ``inputs[indices]`` as float32 (B, crop, crop)."""
    slack = (inputs.shape[-1] - crop) // 2
    return np.asarray(inputs[indices, slack : slack + crop, slack : slack + crop], dtype=np.float32)
