"""A flat detector image -> the network's input: scale, crop around the beam, local contrast normalisation.

Two pipelines, chosen by :class:`PreprocessParams` (stored in every model file):

``ke2018`` (the paper): the whole image is resized bilinearly so its longer side is ``image_size``
(960), LCN is computed on that whole image, and a ``crop`` (720) square is cut around the beam (the
paper cut the centre; the beam is the physically meaningful centre and they coincide on its data).

``native`` (finer detail): a square of ``crop * bin`` native pixels around the beam is normalised by LCN
at native resolution, then binned ``bin`` x ``bin`` by MAX pooling. At the paper's 960 scale a one-pixel
CSPAD spot is averaged with its dark neighbours and fades; max-binning after LCN keeps its contrast.

``block`` (the same as ``native`` with block-aligned windows, ~3x cheaper): LCN of the native pixels
with windows of ``lcn_window`` pixels aligned to ``bin`` x ``bin`` blocks, then max-binning, computed
from block sums (:func:`~dials_cnn.lcn.block_lcn_max`): a one-pixel spot keeps its full contrast.

``binned``: a square of ``crop * bin * pool`` native pixels around the beam is first summed ``bin`` x
``bin`` (photons add up: no aliasing, unlike a non-integer bilinear resize), normalised by LCN at that
scale, then max-binned ``pool`` x ``pool``. Spots spread over several pixels (Rayonix phosphor) keep
their integrated signal; ``pool`` shrinks the network input (speed) without losing a spot's contrast.

Outside the detector the input is 0 (the paper's convention for gaps). ``margin`` extra pixels on every
side are returned for training, where random shifts up to ``margin`` are cut from the stored input.
"""

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from dials_cnn.lcn import block_lcn_max, block_reduce, lcn_torch, zscore

PREPROCESS_VERSION = 1
PIPELINES = ("ke2018", "native", "block", "binned")
CONTRASTS = ("lcn", "linear")


class PreprocessError(ValueError):
    """Preprocessing parameters that this version cannot honour."""


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
    pipeline: str = "ke2018"
    image_size: int = 960  # ke2018: longer side of the resized whole image
    crop: int = 720  # side of the network input
    bin: int = 2  # native: max-binning after LCN; binned: photon summing before LCN
    pool: int = 1  # binned: max-binning after LCN (a one-pixel spot keeps its contrast)
    lcn_window: int = 5
    lcn_std_floor: float = 1.0
    zscore_min_std: float = 0.0  # counts; the global z-score divides by at least this (lcn.zscore)
    contrast: str = "lcn"  # "linear": the global z-score alone, no local normalisation (paper Table 8)
    version: int = PREPROCESS_VERSION

    def __post_init__(self):
        if self.pipeline not in PIPELINES:
            raise PreprocessError(f"unknown preprocessing pipeline {self.pipeline!r} (known: {', '.join(PIPELINES)})")
        if self.contrast not in CONTRASTS:
            raise PreprocessError(f"unknown contrast {self.contrast!r} (known: {', '.join(CONTRASTS)})")
        if self.crop < 8 or self.image_size < 8 or self.bin < 1 or self.pool < 1 or self.lcn_window < 3:
            raise PreprocessError(f"invalid preprocessing parameters: {self}")
        if self.pipeline == "block":
            if self.lcn_window % self.bin or (self.lcn_window // self.bin) % 2 == 0:
                raise PreprocessError(
                    f"the block pipeline needs an LCN window of an odd number of {self.bin}-pixel blocks "
                    f"(e.g. {self.bin * 11}), not {self.lcn_window}")
        elif self.lcn_window % 2 == 0:
            raise PreprocessError(f"the LCN window must be odd, not {self.lcn_window}")
        if self.version != PREPROCESS_VERSION:
            raise PreprocessError(
                f"preprocessing version {self.version} is not supported by this dials_cnn "
                f"(it implements version {PREPROCESS_VERSION})"
            )

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PreprocessError(f"unknown preprocessing parameter(s) {', '.join(unknown)}")
        return cls(**values)


# The paper's pipeline; the finer native one; and the one recommended for the project's default model
# (spotnet): measured on simulated stills it learns far faster on CPU and is 4x cheaper (docs/classifier.md).
KE2018 = PreprocessParams()
NATIVE = PreprocessParams(pipeline="native", crop=720, bin=2)
RECOMMENDED = PreprocessParams(pipeline="binned", crop=360, bin=2, pool=2)


def _cut(image, top, left, size):
    """``image[top:top+size, left:left+size]`` with zeros where that square leaves the image."""
    h, w = image.shape
    if top >= 0 and left >= 0 and top + size <= h and left + size <= w:
        return image[top : top + size, left : left + size]  # a view: no copy
    out = torch.zeros((size, size), dtype=image.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, h), min(left + size, w)
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
    return out


def _square_around(centre_xy, size):
    """(top, left) of a ``size`` square centred on ``centre_xy`` (x fast, y slow; pixel centres at i+0.5)."""
    return int(round(centre_xy[1] - size / 2.0)), int(round(centre_xy[0] - size / 2.0))


def max_bin(image, factor):
    """``factor`` x ``factor`` max-binning of a 2-D tensor whose sides are multiples of ``factor``."""
    return block_reduce(image, factor, torch.maximum)


def sum_bin(image, factor):
    """``factor`` x ``factor`` summing of a 2-D tensor whose sides are multiples of ``factor``."""
    return block_reduce(image, factor, torch.add)


def input_side(params, margin=0):
    return params.crop + 2 * margin


def input_region(params, beam_centre_px, margin=0):
    """(top, left, height, width) of the flat image that :func:`prepare` reads, or None (all of it).

    ``native`` and ``binned`` use only a square around the beam, so a reader may flatten just that
    (:meth:`~dials_cnn.projection.DetectorProjection.flatten` ``region=``); ``ke2018`` resizes the
    whole image first.
    """
    if params.pipeline == "ke2018":
        return None
    native_side = input_side(params, margin) * params.bin * (params.pool if params.pipeline == "binned" else 1)
    top, left = _square_around(beam_centre_px, native_side)
    return top, left, native_side, native_side


def _normalise(image, params):
    """LCN, or with ``contrast="linear"`` the global z-score alone."""
    if params.contrast == "linear":
        return zscore(image, params.zscore_min_std)
    return lcn_torch(image, params.lcn_window, params.lcn_std_floor, params.zscore_min_std)


def prepare(flat, params, augment=None, rng=None, margin=0):
    """The network input for one :class:`~dials_cnn.projection.FlatImage`: float32 (crop+2m, crop+2m).

    ``augment`` (a :class:`~dials_cnn.augment.PhotometricAugment`) changes the counts before LCN,
    where intensity and background physically act; it needs ``rng`` (a numpy Generator).
    """
    if augment is not None:
        flat = augment.apply(flat, rng)
    image = torch.from_numpy(np.ascontiguousarray(flat.data, dtype=np.float32))
    side = input_side(params, margin)
    if params.pipeline == "ke2018":
        h, w = image.shape
        factor = params.image_size / max(h, w)
        size = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
        resized = F.interpolate(image[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        normalised = _normalise(resized, params)
        # Pixel-centre convention: a position p (in pixels) maps to p * factor on the resized grid.
        beam = (flat.beam_centre_px[0] * size[1] / w, flat.beam_centre_px[1] * size[0] / h)
        top, left = _square_around(beam, side)
        out = _cut(normalised, top, left, side)
    else:
        if params.pipeline in ("native", "block"):
            native_side = side * params.bin
            top, left = _square_around(flat.beam_centre_px, native_side)
            region = _cut(image, top, left, native_side)
            if params.pipeline == "block" and params.contrast == "lcn":
                out = block_lcn_max(region, params.bin, params.lcn_window // params.bin, params.lcn_std_floor,
                                    params.zscore_min_std)
            else:
                out = max_bin(_normalise(region, params), params.bin)
        else:
            native_side = side * params.bin * params.pool
            top, left = _square_around(flat.beam_centre_px, native_side)
            region = _cut(image, top, left, native_side)
            out = max_bin(_normalise(sum_bin(region, params.bin), params), params.pool)
    return out.to(torch.float32).numpy()


def prepare_many(flats, params, augment=None, rng=None, margin=0, dtype=np.float32):
    """Stack :func:`prepare` of an iterable of flat images into (N, side, side) of ``dtype``.

    float16 halves the memory of a training set held in memory; LCN outputs are O(1..100), where
    float16 keeps 3 significant digits.
    """
    flats = list(flats)
    side = input_side(params, margin)
    out = np.empty((len(flats), side, side), dtype=dtype)
    for k, flat in enumerate(flats):
        out[k] = prepare(flat, params, augment=augment, rng=rng, margin=margin)
    return out
