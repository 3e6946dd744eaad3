"""Any dxtbx image -> one flat 2-D array around the direct beam (the network's view of a detector).

A single panel normal to the beam is used as stored (no resampling). A multi-panel detector (a
64-ASIC CSPAD, a Pilatus or Eiger with module gaps) is placed on a virtual flat detector normal to
the beam from the panels' lab-frame geometry. The mapping virtual pixel -> source pixel is computed
once per detector and cached, so each image costs one gather.

Conventions (the paper's): gaps, masked and untrusted-low pixels are 0; negatives are clipped to 0.
Pixels above the trusted range are overloads of bright Bragg spots, so they are clipped to the upper
bound rather than zeroed (zeroing them would erase the strongest spots).
"""

import dataclasses
import math

import numpy as np

from dials_cnn import native


class ProjectionError(ValueError):
    """The detector geometry cannot be flattened (e.g. a panel parallel to the beam)."""


@dataclasses.dataclass
class FlatImage:
    """A flat detector image: ``data[slow, fast]`` in counts, ``mask`` True where the pixel is valid."""

    data: np.ndarray  # float32 (slow, fast)
    mask: np.ndarray  # bool, same shape
    beam_centre_px: tuple  # (x fast, y slow), pixel coordinates (pixel centres at i + 0.5)
    pixel_size_mm: float


@dataclasses.dataclass
class DetectorProjection:
    """The precomputed gather of one detector geometry onto a flat grid."""

    shape: tuple  # (slow, fast) of the flat image
    source_index: np.ndarray  # int64 flat index into the concatenated panels, -1 for gaps; None: identity
    beam_centre_px: tuple
    pixel_size_mm: float
    panel_sizes: tuple  # number of pixels per panel, for concatenation
    trusted_ranges: tuple  # per panel (low, high)

    def flatten(self, panels_data, static_mask=None, region=None):
        """``panels_data``: one 2-D array per panel; ``static_mask``: one bool array per panel or None.

        ``region`` (top, left, height, width) on the flat grid: only that part of the flat image is
        made (clipped to the grid; its beam centre is shifted accordingly). A classifier that cuts a
        square around the beam pays for that square instead of the whole detector; the pixels are
        identical to those of the whole flat image.
        """
        if region is not None:
            return self._flatten_region(panels_data, static_mask, region)
        if len(panels_data) != len(self.panel_sizes):
            raise ProjectionError(
                f"image has {len(panels_data)} panel(s), detector model has {len(self.panel_sizes)}"
            )
        cleaned = []
        valid = []
        for k, raw in enumerate(panels_data):
            values = np.asarray(raw, dtype=np.float32)
            if values.size != self.panel_sizes[k]:
                raise ProjectionError(
                    f"panel {k} has {values.size} pixels, detector model says {self.panel_sizes[k]}"
                )
            low, high = self.trusted_ranges[k]
            ok = values > low
            if static_mask is not None:
                ok &= np.asarray(static_mask[k], dtype=bool).reshape(values.shape)
            values = np.where(ok, np.clip(values, 0.0, high), 0.0).astype(np.float32, copy=False)
            cleaned.append(values.ravel())
            valid.append(ok.ravel())
        if self.source_index is None:  # single panel normal to the beam: no resampling
            data = cleaned[0].reshape(self.shape)
            mask = valid[0].reshape(self.shape)
        else:
            values = np.concatenate(cleaned + [np.zeros(1, np.float32)])
            ok = np.concatenate(valid + [np.zeros(1, bool)])
            data = values[self.source_index]  # -1 picks the trailing 0 / False
            mask = ok[self.source_index]
        return FlatImage(data, mask, self.beam_centre_px, self.pixel_size_mm)


    def _check_panels(self, panels_data):
        if len(panels_data) != len(self.panel_sizes):
            raise ProjectionError(
                f"image has {len(panels_data)} panel(s), detector model has {len(self.panel_sizes)}"
            )
        for k, raw in enumerate(panels_data):
            if np.size(raw) != self.panel_sizes[k]:
                raise ProjectionError(
                    f"panel {k} has {np.size(raw)} pixels, detector model says {self.panel_sizes[k]}"
                )

    def clip_region(self, region):
        """(y0, y1, x0, x1): ``region`` (top, left, height, width) clipped to the flat grid."""
        top, left, height, width = (int(v) for v in region)
        y0, x0 = max(top, 0), max(left, 0)
        return y0, min(max(top + height, y0), self.shape[0]), x0, min(max(left + width, x0), self.shape[1])

    def flatten_cut(self, pixels, static_mask, region):
        """:meth:`flatten` with ``region`` for a single panel normal to the beam, given only the
        pixels of ``region`` clipped to the panel (a reader that reads just that part of the file)."""
        if self.source_index is not None:
            raise ProjectionError("only a single panel normal to the beam can be flattened from a cut")
        return self._flatten_region([pixels], static_mask, region, cut=True)

    def _flatten_region(self, panels_data, static_mask, region, cut=False):
        y0, y1, x0, x1 = self.clip_region(region)
        if not cut:
            self._check_panels(panels_data)
        elif np.shape(panels_data[0]) != (y1 - y0, x1 - x0):
            raise ProjectionError(f"cut of shape {np.shape(panels_data[0])}, expected {(y1 - y0, x1 - x0)}")
        if self.source_index is None:
            values = np.asarray(panels_data[0]) if cut else np.asarray(panels_data[0]).reshape(self.shape)[y0:y1, x0:x1]
            valid = None if static_mask is None else np.asarray(static_mask[0], dtype=bool).reshape(self.shape)[y0:y1, x0:x1]
            low, high = self.trusted_ranges[0]
        else:
            index = self.source_index[y0:y1, x0:x1]
            arrays = [np.asarray(r).ravel() for r in panels_data]
            raw = np.concatenate(arrays + [np.zeros(1, arrays[0].dtype)])
            values = raw[index]  # -1 (a gap) picks the trailing 0, made invalid below
            valid = index >= 0
            if static_mask is not None:
                valid &= self._concatenated_mask(static_mask)[index]
            low, high = self._trusted_bounds(index)
        data, ok = _clean(values, valid, low, high)
        beam = (self.beam_centre_px[0] - x0, self.beam_centre_px[1] - y0)
        return FlatImage(data, ok, beam, self.pixel_size_mm)

    def _concatenated_mask(self, static_mask):
        """The static mask of every panel in one array (with a trailing False for gaps), cached."""
        cached = getattr(self, "_mask_cache", None)
        if cached is None or cached[0] is not static_mask:
            joined = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in static_mask] + [np.zeros(1, bool)])
            cached = self._mask_cache = (static_mask, joined)
        return cached[1]

    def _trusted_bounds(self, index):
        """(low, high) trusted values: scalars when all panels agree, else per flat pixel."""
        if len(set(self.trusted_ranges)) == 1:
            return self.trusted_ranges[0]
        panel_of = np.repeat(np.arange(len(self.panel_sizes)), self.panel_sizes)
        bounds = np.array(self.trusted_ranges + ((0.0, 0.0),), dtype=np.float32)
        panel = np.where(index >= 0, panel_of[np.maximum(index, 0)], len(self.panel_sizes))
        return bounds[panel, 0], bounds[panel, 1]



def _clean(values, valid, low, high):
    """(float32 data, bool ok) of raw pixel ``values``: valid where above ``low`` and in ``valid``
    (None: everywhere), clipped to [0, ``high``], 0 where not valid. An int32 cut of one panel goes
    through the compiled pass (:mod:`dials_cnn.native`) when it is built: one pass instead of six."""
    compiled = native.function("clean_cut_i32")
    if (compiled is not None and values.dtype == np.int32 and values.ndim == 2 and values.strides[1] == 4
            and np.ndim(low) == 0 and np.ndim(high) == 0 and (valid is None or valid.strides[1] == 1)):
        data = np.empty(values.shape, np.float32)
        ok = np.empty(values.shape, bool)
        compiled(values.ctypes.data, values.shape[0], values.shape[1], values.strides[0] // 4,
                 None if valid is None else valid.ctypes.data, 0 if valid is None else valid.strides[0],
                 float(low), float(high), data.ctypes.data, ok.ctypes.data)
        return data, ok
    data = values.astype(np.float32)  # a new array: modified in place below
    ok = np.greater(data, low)
    if valid is not None:
        ok &= valid
    # what np.where(ok, np.clip(data, 0, high), 0) gives, without np.clip's slow casting path
    np.maximum(data, 0.0, out=data)
    np.minimum(data, high, out=data)
    if np.issubdtype(values.dtype, np.integer):
        data *= ok  # one pass; the same as the copy below when there is no NaN
    else:
        np.copyto(data, 0.0, where=~ok)
    return data, ok

def _beam_unit(beam):
    direction = np.array(beam.get_s0(), dtype=np.float64)
    norm = np.linalg.norm(direction)
    if norm == 0:
        raise ProjectionError("beam has no direction")
    return direction / norm


def build_projection(detector, beam):
    """Compute the :class:`DetectorProjection` of ``detector`` seen along ``beam``."""
    unit = _beam_unit(beam)
    panels = list(detector)
    trusted = tuple(tuple(float(v) for v in p.get_trusted_range()) for p in panels)
    sizes = tuple(int(p.get_image_size()[0] * p.get_image_size()[1]) for p in panels)
    first = panels[0]
    normal = np.cross(first.get_fast_axis(), first.get_slow_axis())
    if len(panels) == 1 and abs(abs(np.dot(normal, unit)) - 1) < 1e-6:
        nfast, nslow = first.get_image_size()
        centre = first.get_beam_centre_px(beam.get_s0())
        return DetectorProjection(
            (nslow, nfast), None, (float(centre[0]), float(centre[1])),
            float(first.get_pixel_size()[0]), sizes, trusted,
        )
    # Virtual plane normal to the beam; its axes follow the first panel's axes projected onto it.
    fast_axis = np.array(first.get_fast_axis()) - np.dot(first.get_fast_axis(), unit) * unit
    if np.linalg.norm(fast_axis) < 1e-6:
        raise ProjectionError("the first panel's fast axis is parallel to the beam")
    fast_axis /= np.linalg.norm(fast_axis)
    slow_axis = np.array(first.get_slow_axis()) - np.dot(first.get_slow_axis(), unit) * unit
    slow_axis -= np.dot(slow_axis, fast_axis) * fast_axis
    if np.linalg.norm(slow_axis) < 1e-6:
        slow_axis = np.cross(unit, fast_axis)
    slow_axis /= np.linalg.norm(slow_axis)
    pixel_size = min(min(p.get_pixel_size()) for p in panels)
    plane_distance = float(np.mean([np.dot(p.get_origin(), unit) for p in panels]))
    if plane_distance <= 0:
        raise ProjectionError("the detector is not downstream of the sample")

    def to_plane(points):
        """Lab points (K, 3) -> virtual-plane coordinates (K, 2) in pixels, along rays from the sample."""
        along = points @ unit
        if np.any(along <= 0):
            raise ProjectionError("a panel lies behind the sample")
        on_plane = points * (plane_distance / along)[:, None]
        return np.stack([on_plane @ fast_axis, on_plane @ slow_axis], axis=1) / pixel_size

    # The grid's phase follows the first panel's pixel corners, so panels normal to the beam at the
    # plane's distance map one to one (no resampling); extent from every panel's projected corners.
    anchor = to_plane(np.array([first.get_origin()]))[0]
    corners = []
    for panel in panels:
        nfast, nslow = panel.get_image_size()
        lab = np.array([panel.get_pixel_lab_coord((f, s)) for f in (0, nfast) for s in (0, nslow)])
        corners.append(to_plane(lab) - anchor)
    all_corners = np.concatenate(corners)
    low = np.floor(all_corners.min(axis=0) + 1e-6).astype(np.int64)
    high = np.ceil(all_corners.max(axis=0) - 1e-6).astype(np.int64)
    nfast_v, nslow_v = (high - low).tolist()
    index = np.full((nslow_v, nfast_v), -1, dtype=np.int64)
    offset = 0
    for panel, panel_corners, size in zip(panels, corners, sizes):
        # Inverse map: the centre of every virtual pixel under this panel's footprint, back along its
        # ray onto the panel; the panel pixel it hits is its source (nearest neighbour, no holes).
        c0 = np.floor(panel_corners.min(axis=0) + 1e-6).astype(np.int64) - low
        c1 = np.ceil(panel_corners.max(axis=0) - 1e-6).astype(np.int64) - low
        cols = np.arange(max(c0[0], 0), min(c1[0], nfast_v))
        rows = np.arange(max(c0[1], 0), min(c1[1], nslow_v))
        u = (cols + low[0] + 0.5 + anchor[0]) * pixel_size
        v = (rows + low[1] + 0.5 + anchor[1]) * pixel_size
        rays = (plane_distance * unit)[None, None, :] + v[:, None, None] * slow_axis + u[None, :, None] * fast_axis
        origin = np.array(panel.get_origin())
        fast, slow = np.array(panel.get_fast_axis()), np.array(panel.get_slow_axis())
        normal = np.cross(fast, slow)
        denominator = rays @ normal
        with np.errstate(divide="ignore", invalid="ignore"):
            hit = rays * (np.dot(origin, normal) / denominator)[..., None] - origin
        px_fast, px_slow = panel.get_pixel_size()
        nfast, nslow = panel.get_image_size()
        a = np.floor(hit @ fast / px_fast)
        b = np.floor(hit @ slow / px_slow)
        inside = (denominator != 0) & (a >= 0) & (a < nfast) & (b >= 0) & (b < nslow)
        source = np.where(inside, offset + b * nfast + a, -1).astype(np.int64)
        block = index[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] if len(rows) and len(cols) else None
        if block is not None:
            block[inside] = source[inside]  # where panels overlap on the plane, the later one wins
        offset += size
    beam_px = (float(-anchor[0] - low[0]), float(-anchor[1] - low[1]))
    return DetectorProjection(
        (int(nslow_v), int(nfast_v)), index, beam_px, float(pixel_size), sizes, trusted,
    )


def _rounded(vector, digits):
    return tuple(round(v, digits) for v in vector)


def _geometry_key(detector, beam):
    """What the projection depends on, rounded. Plain Python on the 3-vectors: numpy's per-call overhead
    made this 0.4 ms of every still (each still of a run may have its own distance or wavelength)."""
    s0 = beam.get_s0()
    norm = math.sqrt(s0[0] * s0[0] + s0[1] * s0[1] + s0[2] * s0[2]) or 1.0  # 0: build_projection says why
    parts = [_rounded((s0[0] / norm, s0[1] / norm, s0[2] / norm), 9)]
    for p in detector:
        parts.append(
            (p.get_image_size(), p.get_pixel_size(), _rounded(p.get_origin(), 6),
             _rounded(p.get_fast_axis(), 9), _rounded(p.get_slow_axis(), 9), p.get_trusted_range())
        )
    return tuple(parts)


_PROJECTIONS = {}


def projection_for(detector, beam):
    """Cached :func:`build_projection` (keyed by the geometry, so stills sharing it share the lookup)."""
    key = _geometry_key(detector, beam)
    projection = _PROJECTIONS.get(key)
    if projection is None:
        if len(_PROJECTIONS) > 64:
            _PROJECTIONS.clear()
        projection = _PROJECTIONS[key] = build_projection(detector, beam)
    return projection


def static_mask(imageset):
    """Per-panel bool arrays from the format's static mask (or None): read once per imageset."""
    lookup = imageset.external_lookup.mask.data
    if lookup.empty():
        return None
    return [np.asarray(tile.data().as_numpy_array(), dtype=bool) for tile in lookup]


def read_panels(imageset, index):
    """The raw pixels of image ``index``: one numpy array per panel."""
    raw = imageset.get_raw_data(index)
    if not isinstance(raw, tuple):
        raw = (raw,)
    return [r.as_numpy_array() for r in raw]


def flatten_image(imageset, index, mask=None, region=None):
    """Read image ``index`` of a dxtbx ``imageset`` as a :class:`FlatImage`.

    ``mask`` is :func:`static_mask` of the imageset when the caller reads many images (pass it to
    avoid rebuilding it); otherwise it is looked up here. ``region``: see
    :meth:`DetectorProjection.flatten`.
    """
    detector = imageset.get_detector(index)
    beam = imageset.get_beam(index)
    raw = imageset.get_raw_data(index)
    if not isinstance(raw, tuple):
        raw = (raw,)
    panels_data = [r.as_numpy_array() for r in raw]
    if mask is None:
        mask = static_mask(imageset)
    return projection_for(detector, beam).flatten(panels_data, mask, region)


def flat_from_array(data, beam_centre_px=None, pixel_size_mm=0.11, mask=None):
    """A :class:`FlatImage` from an in-memory array (simulated stills, tests); negatives clipped to 0."""
    values = np.asarray(data, dtype=np.float32)
    valid = np.ones(values.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    values = np.where(valid, np.clip(values, 0.0, None), 0.0).astype(np.float32, copy=False)
    if beam_centre_px is None:
        beam_centre_px = (values.shape[1] / 2.0, values.shape[0] / 2.0)
    return FlatImage(values, valid, (float(beam_centre_px[0]), float(beam_centre_px[1])), float(pixel_size_mm))
