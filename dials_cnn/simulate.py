"""Realistic XFEL still simulator: the data engine for training, tests and benchmarks.

One shot is drawn in two steps. :func:`sample_shot` draws every per-shot parameter from a preset
(``dials_cnn.presets``) into a :class:`Shot`; :func:`simulate_still` turns a shot into the raw integer
image a detector would have written, its static mask and the truth (expert label, visible spot count,
...). :func:`simulate_run` writes many shots in the project's HDF5 layouts with an fv5080
``expert_annotation.txt`` and a ``truth.csv``. The physics, the visibility criterion behind the labels
and the speed tricks are described in docs/simulator.md; in short:

* geometry is dxtbx's: a single flat panel (fast +x, slow -y) and a simple beam, as the CXIDB-76
  reader builds them; crystals are dxtbx crystals from the unit cell and space group in a uniformly
  random orientation;
* Bragg positions follow DIALS' still prediction (``StillsDeltaPsiReflectionPredictor``: rotate the
  relp onto the Ewald sphere about the axis normal to s0 and the relp); every relp within a few
  widths of the Nave mosaic model (Δψ < d/Ds + η/2, widened by the SASE bandwidth) is drawn with a
  Gaussian partiality in Δψ;
* intensities: |F|² exponential (acentric Wilson statistics, fixed per crystal form and hkl),
  Wilson B-factor fall-off, a soft cut at the crystal's resolution limit, polarisation; the overall
  brightness is chosen so that exactly the drawn number of spots passes the visibility criterion
  inside the expert's window (which gives class proportions on target and dense class boundaries);
* background: air scatter (at 1 atm), solvent scatter, water ring at 3.0-3.7 Å, polarisation and
  obliquity, computed on a 2x2-binned grid; delivery artefacts: liquid-jet streaks, the Kapton belt
  shadow; CSPAD: ASIC gaps, bright ASIC border lines, dark-subtraction offsets and negatives,
  low-gain zone (×7), shadowed ASICs; Rayonix: phosphor point spread with wide tails, correlated
  noise, central hole; Pilatus / Eiger-like photon counters with module gaps (-1);
* noise: Poisson photon noise (exact by table inversion below 16 photons, normal above), gain
  (ADU/photon), read noise, saturation at the trusted maximum.
"""

import csv
import dataclasses
import functools
import logging
import math
import os
import time
import zlib
from typing import List, Optional, Tuple

import numpy as np
import torch

from dials_cnn import presets as presets_module
from dials_cnn.memory import keep_freed_memory
from dials_cnn.presets import get_preset

logger = logging.getLogger("dials.cnn_simulate")

LABELS = ("HIT", "MAYBE", "MISS")
HIT_MIN_SPOTS = 10  # expert rule (paper §3.3.1): HIT >= 10 spots, MAYBE 4-9, else MISS
MAYBE_MIN_SPOTS = 4

#: Variance reduction of the [1, 2, 1] x [1, 2, 1] / 16 filter that models the phosphor's
#: correlated noise on the Rayonix: sum of squared weights.
RAYONIX_NOISE_CORRELATION = (6 / 16) ** 2

LAYOUT_FAMILIES = {"idh5": None, "raw_cspad": ("cspad",), "rayonix_binned": ("rayonix",)}

# dxtbx treats values <= the minimum as untrusted: photon counters trust 0 and flag gaps (-1); the
# Rayonix hole (0) is flagged, so randomised Rayonix shots carry a hardware offset (pedestal)
_FAMILY_TRUSTED = {"cspad": (-50, 15000), "rayonix": (0, 65535), "pilatus": (-1, 1048575), "eiger": (-1, 1048575)}


class SimulationError(ValueError):
    """Bad simulation parameters; the message says which and what to do."""


def label_for_count(n_visible):
    """The expert's rule: HIT >= 10 visible spots, MAYBE 4-9, MISS otherwise."""
    if n_visible >= HIT_MIN_SPOTS:
        return "HIT"
    if n_visible >= MAYBE_MIN_SPOTS:
        return "MAYBE"
    return "MISS"


# ------------------------------------------------------------------------------ detector frames


@dataclasses.dataclass(frozen=True)
class DetectorFrame:
    """The assembled pixel frame of one detector family."""

    family: str
    name: str
    sensor: str  # dxtbx sensor type
    shape: Tuple[int, int]  # (slow, fast)
    pixel_size_mm: float
    beam_centre_px: Tuple[float, float]  # nominal (x=fast, y=slow)
    gap_value: int  # written where no pixel records photons (CSPAD gaps 0, hole 0, module gaps -1)
    active_areas: Optional[tuple]  # idh5 ACTIVE_AREAS tiles (x=slow, y=fast, lower-right exclusive)
    hole_radius_px: float = 0.0
    photon_counting: bool = False

    @functools.cached_property
    def active(self):
        """True where a pixel records photons."""
        if self.family == "cspad":
            from dials_cnn import cspad

            return cspad.asic_pixel_mask()
        active = np.zeros(self.shape, dtype=bool)
        if self.active_areas:
            tiles = np.asarray(self.active_areas).reshape(-1, 4)
            for s0, f0, s1, f1 in tiles:
                active[s0:s1, f0:f1] = True
        else:
            active[:] = True
        if self.hole_radius_px > 0:
            active &= ~self._hole()
        return active

    def _hole(self):
        slow, fast = np.ogrid[: self.shape[0], : self.shape[1]]
        cx, cy = self.beam_centre_px
        return (fast + 0.5 - cx) ** 2 + (slow + 0.5 - cy) ** 2 < self.hole_radius_px**2

    @functools.cached_property
    def static_mask(self):
        """Good pixels as the readers define them: inside tiles shrunk by one pixel, off the hole."""
        if not self.active_areas:
            return self.active.copy()
        mask = np.zeros(self.shape, dtype=bool)
        for s0, f0, s1, f1 in np.asarray(self.active_areas).reshape(-1, 4):
            mask[s0 + 1 : s1 - 1, f0 + 1 : f1 - 1] = True
        if self.hole_radius_px > 0:
            mask &= ~self._hole()
        return mask

    @functools.cached_property
    def inactive_index(self):
        """Flat indices of pixels that record nothing (gaps, hole)."""
        return np.flatnonzero(~self.active)

    @functools.cached_property
    def border(self):
        """CSPAD double pixel lines where the two ASICs of a sensor meet (None elsewhere)."""
        if self.family != "cspad":
            return None
        from dials_cnn import cspad

        return np.flatnonzero(cspad.asic_border_pixels())


def _module_tiles(n_fast, n_slow, module, gap_fast, gap_slow):
    tiles = []
    for j in range(n_slow):
        for i in range(n_fast):
            s0 = j * (module[0] + gap_slow)
            f0 = i * (module[1] + gap_fast)
            tiles.extend([s0, f0, s0 + module[0], f0 + module[1]])
    return tuple(tiles)


@functools.lru_cache(maxsize=None)
def detector_frame(family):
    """The :class:`DetectorFrame` of ``family`` (cspad, rayonix, pilatus, eiger)."""
    if family == "cspad":
        from dials_cnn import cspad

        return DetectorFrame(
            family="cspad",
            name="CSPAD",
            sensor="PAD",
            shape=tuple(cspad.ASSEMBLED_SHAPE),
            pixel_size_mm=cspad.PIXEL_SIZE_MM,
            beam_centre_px=(cspad.CENTRE_PIXEL[1] + 0.5, cspad.CENTRE_PIXEL[0] + 0.5),
            gap_value=0,
            active_areas=tuple(cspad.active_areas()),
        )
    if family == "rayonix":
        return DetectorFrame(
            family="rayonix",
            name="Rayonix MX170-HS",
            sensor="CCD",
            shape=(1920, 1920),
            pixel_size_mm=0.088,  # 0.044 mm binned 2x2 in hardware
            beam_centre_px=(960.0, 960.0),
            gap_value=0,
            active_areas=None,
            hole_radius_px=30.0,
        )
    if family == "pilatus":  # Pilatus 2M-like: 3 x 8 modules of 487 x 195, gaps 7 / 17
        return DetectorFrame(
            family="pilatus",
            name="Pilatus-like 2M",
            sensor="PAD",
            shape=(1679, 1475),
            pixel_size_mm=0.172,
            beam_centre_px=(737.3, 830.6),
            gap_value=-1,
            active_areas=_module_tiles(3, 8, (195, 487), 7, 17),
            photon_counting=True,
        )
    if family == "eiger":  # Eiger 4M-like: 2 x 4 modules of 1030 x 514, gaps 10 / 37
        return DetectorFrame(
            family="eiger",
            name="Eiger-like 4M",
            sensor="PAD",
            shape=(2167, 2070),
            pixel_size_mm=0.075,
            beam_centre_px=(1010.4, 1102.7),
            gap_value=-1,
            active_areas=_module_tiles(2, 4, (514, 1030), 10, 37),
            photon_counting=True,
        )
    raise SimulationError(f"unknown detector family {family!r}; choose one of {presets_module.FAMILIES}")


# ------------------------------------------------------------------------------ the shot


@dataclasses.dataclass
class CrystalShot:
    """One crystal (lattice) in the beam."""

    unit_cell: Tuple[float, ...]
    space_group: str
    orientation: Tuple[float, ...]  # U, row-major 3x3 rotation
    mosaic_half_deg: float
    domain_size_A: float
    b_factor: float
    resolution_limit_A: float
    relative_scale: float = 1.0
    structure_seed: int = 0  # fixes |F|^2 per hkl for a crystal form

    def model(self):
        """The dxtbx crystal (with the Nave mosaic parameters DIALS' still predictor uses)."""
        from cctbx import sgtbx, uctbx
        from dxtbx.model import MosaicCrystalSauter2014

        cell = uctbx.unit_cell(tuple(self.unit_cell))
        orthogonalisation = np.array(cell.orthogonalization_matrix()).reshape(3, 3)
        rotated = np.array(self.orientation).reshape(3, 3) @ orthogonalisation
        axes = [tuple(rotated[:, i]) for i in range(3)]  # columns of O are a, b, c
        crystal = MosaicCrystalSauter2014(
            axes[0], axes[1], axes[2], space_group=sgtbx.space_group_info(self.space_group).group()
        )
        crystal.set_half_mosaicity_deg(self.mosaic_half_deg)
        crystal.set_domain_size_ang(self.domain_size_A)
        return crystal


@dataclasses.dataclass
class Shot:
    """Every per-shot parameter; :func:`simulate_still` is deterministic given a shot and an rng."""

    preset: str
    family: str
    image_shape: Tuple[int, int]
    pixel_size_mm: float
    beam_centre_px: Tuple[float, float]
    distance_mm: float
    wavelength_A: float
    bandwidth: float
    pulse: bool  # False: no X-rays (dark noise only)
    crystals: List[CrystalShot]
    target_visible_spots: Optional[int]  # brightness is solved so that this many are visible
    brightness: Optional[float]  # photons of a unit-weight reflection; None: solved from the target
    intended_label: str
    # detector response
    gain: float  # DIALS spot-finder gain: variance / mean of a pixel's ADU
    adu_per_photon: float
    read_noise_adu: float
    pedestal_adu: float
    min_trusted_value: int
    saturated_value: int
    psf_sigma_px: float
    psf_tail_fraction: float
    psf_tail_scale: float
    # background, photons per pixel near the beam
    sample_in_beam: bool
    air_scatter: float
    solvent_scatter: float
    water_ring: float
    water_ring_d_A: float
    water_ring_grain: float
    # artefacts
    jet_streak: Optional[Tuple[float, float, float, float]]  # angle_deg, photons, length_px, width_px
    kapton: Optional[Tuple[float, float, float]]  # edge angle_deg, edge offset px, transmission
    asic_border_excess: float = 0.0
    common_mode_sigma_adu: float = 0.0
    low_gain_d_A: Optional[float] = None
    low_gain_factor: float = 7.0
    shadowed_lower_asics: bool = False
    ice_rings: Optional[Tuple[float, float, float]] = None  # photons/pixel, sigma in 1/d, grain (0 smooth)
    # radius_px, arm angle_deg, arm width_px (0: no arm), transmission, edge_px (penumbra)
    beamstop: Optional[Tuple[float, float, float, float, float]] = None
    # the expert
    window_px: Tuple[int, int] = (945, 520)
    window_beam_fraction: float = 0.85
    visible_snr: float = 5.0
    visible_peak_sigma: float = 2.0
    visible_min_photons: float = 4.0

    @property
    def frame(self):
        return detector_frame(self.family)

    @property
    def artefacts(self):
        names = []
        if not self.pulse:
            names.append("no_pulse")
        if self.pulse and self.sample_in_beam and self.water_ring > 0:
            names.append("water_ring")
        if self.pulse and self.jet_streak:
            names.append("jet_streak")
        if self.pulse and self.kapton:
            names.append("kapton_shadow")
        if self.pulse and self.sample_in_beam and self.ice_rings:
            names.append("ice_rings")
        if self.pulse and self.beamstop:
            names.append("beamstop")
        if len(self.crystals) > 1:
            names.append("multiple_lattices")
        if self.family == "cspad" and self.asic_border_excess > 0:
            names.append("asic_borders")
        if self.low_gain_d_A:
            names.append("low_gain_zone")
        if self.shadowed_lower_asics:
            names.append("shadowed_asics")
        return names

    def expert_window(self):
        """(x0, x1, y0, y1) pixel bounds of the expert's inspection window, beam at lower centre."""
        width, height = self.window_px
        cx, cy = self.beam_centre_px
        x0 = cx - width / 2
        y0 = cy - self.window_beam_fraction * height
        return (x0, x0 + width, y0, y0 + height)


@dataclasses.dataclass
class Still:
    image: np.ndarray  # 2-D int32, raw ADU in the assembled frame
    mask: np.ndarray  # bool, True = good pixel
    beam_centre_px: Tuple[float, float]
    pixel_size_mm: float
    distance_mm: float
    wavelength_A: float
    family: str
    truth: dict
    shot: Shot
    spots: dict  # per drawn reflection: hkl, x, y, photons, visible, in_window, d


# ------------------------------------------------------------------------------ sampling


def _uniform(rng, bounds):
    low, high = bounds
    return float(low) if high <= low else float(rng.uniform(low, high))


def _log_uniform(rng, low, high):
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def random_rotation(rng):
    """Uniformly distributed rotation matrix (normalised Gaussian quaternion)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _crystal_form_seed(unit_cell, space_group):
    return zlib.crc32(("%s|%s" % (tuple(round(v, 1) for v in unit_cell), space_group)).encode())


def _adu_per_photon(family, gain):
    if family == "rayonix":
        # the phosphor spreads each photon's light: correlated noise makes variance/mean smaller
        return gain / RAYONIX_NOISE_CORRELATION
    if family in ("pilatus", "eiger"):
        return 1.0
    return gain


# Space groups (with the cell constraints of their lattice) for randomised crystal forms.
_RANDOM_SPACE_GROUPS = (
    ("P 1", "triclinic"),
    ("P 1 21 1", "monoclinic"),
    ("C 1 2 1", "monoclinic"),
    ("P 21 21 21", "orthorhombic"),
    ("P 21 21 21", "orthorhombic"),
    ("P 21 21 2", "orthorhombic"),
    ("C 2 2 21", "orthorhombic"),
    ("I 2 2 2", "orthorhombic"),
    ("P 41 21 2", "tetragonal"),
    ("P 43 21 2", "tetragonal"),
    ("I 4", "tetragonal"),
    ("P 32 2 1", "hexagonal"),
    ("P 61 2 2", "hexagonal"),
    ("P 63", "hexagonal"),
    ("R 3 :H", "hexagonal"),
    ("P 21 3", "cubic"),
    ("I 2 3", "cubic"),
)


def _random_cell(rng):
    symbol, system = _RANDOM_SPACE_GROUPS[rng.integers(len(_RANDOM_SPACE_GROUPS))]
    a, b, c = (_log_uniform(rng, 30.0, 350.0) for _ in range(3))
    if system == "cubic":
        a = b = c = min(a, 200.0)
    if system in ("tetragonal", "hexagonal"):
        b = a
    volume_cap = 2.0e7  # keep the number of reflections near the Ewald sphere manageable
    if a * b * c > volume_cap:
        factor = (volume_cap / (a * b * c)) ** (1 / 3)
        a, b, c = a * factor, b * factor, c * factor
        if system in ("tetragonal", "hexagonal", "cubic"):
            b = a
        if system == "cubic":
            c = a
    alpha = beta = gamma = 90.0
    if system == "hexagonal":
        gamma = 120.0
    elif system == "monoclinic":
        beta = rng.uniform(92.0, 118.0)
    elif system == "triclinic":
        alpha, beta, gamma = rng.uniform(75.0, 105.0, 3)
    return (a, b, c, float(alpha), float(beta), float(gamma)), symbol


def _random_domain_sizes(rng):
    """The (low, high) mosaic domain sizes of a randomised preset, down to nanocrystals of a few dozen
    cells, whose spots are several pixels broad (as other simulators draw them): one shot in four
    has domains below 500 Å. Trained on domains of 400 Å and more only, the default model missed a
    third of the HITs with such spots."""
    low = _log_uniform(rng, 120.0, 3000.0)
    return low, low * _log_uniform(rng, 1.5, 12.0)


_BEAMSTOP_PROBABILITY = {"cspad": 0.1, "rayonix": 0.2, "pilatus": 0.5, "eiger": 0.5}


def randomised_preset(base, rng):
    """A preset drawn well beyond ``base``: any detector family, 6-14 keV, cells 30-350 Å, gains
    0.1-20 ADU/photon, backgrounds from photon-counting near zero to strong, any artefacts, and
    class targets spanning the HIT/MAYBE/MISS boundaries densely. Drives training of the default model."""
    family = str(rng.choice(presets_module.FAMILIES, p=(0.3, 0.3, 0.2, 0.2)))
    cell, symbol = _random_cell(rng)
    photon_counting = family in ("pilatus", "eiger")
    gain = 1.0 if photon_counting else _log_uniform(rng, 0.1, 20.0)
    psf = {"cspad": (0.15, 0.8), "rayonix": (0.6, 2.5), "pilatus": (0.15, 0.5), "eiger": (0.15, 0.45)}[family]
    psf_low = rng.uniform(*psf)
    background = _log_uniform(rng, 0.002, 150.0)  # overall photons per pixel near the beam
    shares = rng.dirichlet((1.0, 1.0, 1.0))
    resolution = rng.uniform(1.4, 6.0)
    hit_median = _log_uniform(rng, 12.0, 200.0)
    changes = dict(
        name="random",
        description="randomised",
        family=family,
        energy_keV=rng.uniform(6.0, 14.0),
        bandwidth=_log_uniform(rng, 0.0005, 0.01),
        unit_cell=cell,
        space_group=symbol,
        distance_mm=_log_uniform(rng, 50.0, 350.0),
        distance_jitter_mm=0.0,
        beam_jitter_px=25.0,
        gain=gain,
        read_noise_adu=0.0 if photon_counting else rng.uniform(0.0, 2.0) * max(gain, 1.0),
        pedestal_adu=0.0 if family != "rayonix" else float(rng.choice([10.0, 40.0])),
        min_trusted_value=_FAMILY_TRUSTED[family][0],
        saturated_value=_FAMILY_TRUSTED[family][1],
        psf_sigma_px=(psf_low, psf_low * rng.uniform(1.0, 1.6)),
        psf_tail_fraction=rng.uniform(0.0, 0.25) if family == "rayonix" else 0.0,
        psf_tail_scale=rng.uniform(3.0, 8.0),
        mosaic_half_deg=(0.005, _log_uniform(rng, 0.01, 0.4)),
        domain_size_A=_random_domain_sizes(rng),
        b_factor=(5.0, rng.uniform(20.0, 100.0)),
        resolution_limit_A=(resolution, resolution * rng.uniform(1.0, 1.6)),
        multi_lattice_probability=rng.uniform(0.0, 0.4),
        class_fractions=(0.4, 0.25, 0.35),
        hit_spots_median=hit_median,
        hit_spots_spread=rng.uniform(0.3, 1.2),
        miss_weak_crystal_fraction=0.4,
        blank_fraction=0.02,
        sample_miss_fraction=0.3,
        air_scatter=(0.0, background * shares[0]),
        solvent_scatter=(0.0, background * shares[1]),
        water_ring=(0.0, background * shares[2] * 2.0) if rng.random() < 0.8 else (0.0, 0.0),
        water_ring_d_A=(3.0, 3.5),
        water_ring_grain=rng.uniform(0.0, 0.4) if family == "cspad" else rng.uniform(0.0, 0.15),
        jet_streak_probability=0.45,
        jet_streak_angle_deg=rng.uniform(-90.0, 90.0),
        kapton_probability=0.25,
        kapton_transmission=(0.6, 0.95),
        kapton_angle_deg=rng.uniform(0.0, 180.0),
        ice_ring_probability=0.3,  # frozen samples (fixed targets, cryo loops); the presets have none
        # the presets have none either; CSPADs have a hole round the beam, synchrotron counters a stop
        beamstop_probability=_BEAMSTOP_PROBABILITY[family],
        asic_border_excess=rng.uniform(0.0, 2.0) if family == "cspad" else 0.0,
        common_mode_sigma_adu=rng.uniform(0.0, 3.0) * max(gain, 1.0) if family == "cspad" else 0.0,
        low_gain_d_A=float(rng.uniform(2.5, 5.0)) if family == "cspad" and rng.random() < 0.15 else None,
        shadowed_lower_asics=bool(family == "cspad" and rng.random() < 0.1),
        visible_snr=rng.uniform(4.5, 6.0),
    )
    return dataclasses.replace(base, **changes)


def _draw_target(preset, label, rng):
    """Visible-spot target for a class, dense near the class boundaries."""
    if label == "HIT":
        if rng.random() < 0.3:
            return int(rng.integers(HIT_MIN_SPOTS, HIT_MIN_SPOTS + 5))
        n = preset.hit_spots_median * math.exp(preset.hit_spots_spread * rng.standard_normal())
        return int(min(max(round(n), HIT_MIN_SPOTS), 3000))
    if label == "MAYBE":
        return int(rng.integers(MAYBE_MIN_SPOTS, HIT_MIN_SPOTS))
    return int(rng.choice(4, p=(0.15, 0.2, 0.3, 0.35)))


def sample_shot(preset, rng, randomise=False, vary_beam_centre=True):
    """Draw every per-shot parameter of one still from ``preset`` (a name or a Preset).

    ``randomise=True`` first draws a preset far beyond the given one (:func:`randomised_preset`).
    ``vary_beam_centre=False`` keeps the detector's nominal beam centre (files store one per run).
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    if randomise:
        preset = randomised_preset(preset, rng)
    frame = detector_frame(preset.family)

    fractions = np.asarray(preset.class_fractions, dtype=float)
    label = LABELS[rng.choice(3, p=fractions / fractions.sum())]
    pulse = True
    crystal_count = 0
    sample_in_beam = True
    target = None
    if label == "MISS":
        miss_share = fractions[2] / fractions.sum()
        if miss_share > 0 and rng.random() < min(1.0, preset.blank_fraction / miss_share):
            pulse = False
        elif rng.random() < preset.miss_weak_crystal_fraction:
            crystal_count = 1
            target = _draw_target(preset, label, rng)
        elif rng.random() < preset.sample_miss_fraction:
            sample_in_beam = False
    else:
        crystal_count = 1
        target = _draw_target(preset, label, rng)
    if crystal_count and rng.random() < preset.multi_lattice_probability:
        crystal_count += int(rng.integers(1, max(2, preset.max_lattices)))

    crystals = []
    form_seed = _crystal_form_seed(preset.unit_cell, preset.space_group)
    for i in range(crystal_count):
        crystals.append(
            CrystalShot(
                unit_cell=tuple(float(v) for v in preset.unit_cell),
                space_group=preset.space_group,
                orientation=tuple(random_rotation(rng).ravel()),
                mosaic_half_deg=_uniform(rng, preset.mosaic_half_deg),
                domain_size_A=_uniform(rng, preset.domain_size_A),
                b_factor=_uniform(rng, preset.b_factor),
                resolution_limit_A=_uniform(rng, preset.resolution_limit_A),
                relative_scale=1.0 if i == 0 else float(rng.uniform(0.15, 1.0)),
                structure_seed=form_seed,
            )
        )

    beam_x, beam_y = frame.beam_centre_px
    if vary_beam_centre and preset.beam_jitter_px > 0:
        beam_x += float(rng.normal(0.0, preset.beam_jitter_px))
        beam_y += float(rng.normal(0.0, preset.beam_jitter_px))
    distance = max(20.0, preset.distance_mm + float(rng.normal(0.0, preset.distance_jitter_mm)))
    wavelength = preset.wavelength_A * (1.0 + float(rng.normal(0.0, 0.0005)))

    jet_streak = None
    if pulse and sample_in_beam and rng.random() < preset.jet_streak_probability:
        jet_streak = (
            preset.jet_streak_angle_deg + float(rng.normal(0.0, 3.0)),
            _log_uniform(rng, 5.0, 300.0),  # photons per pixel at 10 px from the beam
            float(rng.uniform(60.0, 500.0)),
            float(rng.uniform(0.6, 1.6)),
        )
    kapton = None
    if pulse and rng.random() < preset.kapton_probability:
        kapton = (
            preset.kapton_angle_deg + float(rng.normal(0.0, 2.0)),
            float(rng.uniform(-40.0, 40.0)),
            _uniform(rng, preset.kapton_transmission),
        )
    ice_rings = None  # no draw at probability 0: the presets' stills stay as they were
    if pulse and sample_in_beam and preset.ice_ring_probability > 0 and rng.random() < preset.ice_ring_probability:
        ice_rings = (
            _log_uniform(rng, *preset.ice_ring_photons),
            _log_uniform(rng, *preset.ice_ring_width),
            _log_uniform(rng, 0.3, 5.0) if rng.random() < 0.5 else 0.0,  # spotty: many small ice grains
        )
    solvent = _uniform(rng, preset.solvent_scatter) if sample_in_beam else 0.0
    ring = _uniform(rng, preset.water_ring) if sample_in_beam else 0.0
    beamstop = None  # drawn last, and not at probability 0: every other parameter stays as it was
    if pulse and preset.beamstop_probability > 0 and rng.random() < preset.beamstop_probability:
        px = frame.pixel_size_mm
        arm = rng.random() < preset.beamstop_arm_probability
        beamstop = (
            _log_uniform(rng, *preset.beamstop_radius_mm) / px,
            float(rng.uniform(0.0, 360.0)),
            _uniform(rng, preset.beamstop_arm_width_mm) / px if arm else 0.0,
            _log_uniform(rng, *preset.beamstop_transmission),
            float(rng.uniform(0.5, 3.0)),
        )
    return Shot(
        preset=preset.name,
        family=preset.family,
        image_shape=frame.shape,
        pixel_size_mm=frame.pixel_size_mm,
        beam_centre_px=(beam_x, beam_y),
        distance_mm=distance,
        wavelength_A=wavelength,
        bandwidth=preset.bandwidth,
        pulse=pulse,
        crystals=crystals,
        target_visible_spots=target if crystals else None,
        brightness=None,
        intended_label=label,
        gain=preset.gain,
        adu_per_photon=_adu_per_photon(preset.family, preset.gain),
        read_noise_adu=preset.read_noise_adu,
        pedestal_adu=preset.pedestal_adu,
        min_trusted_value=preset.min_trusted_value,
        saturated_value=preset.saturated_value,
        psf_sigma_px=_uniform(rng, preset.psf_sigma_px),
        psf_tail_fraction=preset.psf_tail_fraction,
        psf_tail_scale=preset.psf_tail_scale,
        sample_in_beam=sample_in_beam,
        air_scatter=_uniform(rng, preset.air_scatter),
        solvent_scatter=solvent,
        water_ring=ring,
        water_ring_d_A=_uniform(rng, preset.water_ring_d_A),
        water_ring_grain=preset.water_ring_grain,
        jet_streak=jet_streak,
        kapton=kapton,
        ice_rings=ice_rings,
        beamstop=beamstop,
        asic_border_excess=preset.asic_border_excess,
        common_mode_sigma_adu=preset.common_mode_sigma_adu,
        low_gain_d_A=preset.low_gain_d_A,
        low_gain_factor=preset.low_gain_factor,
        shadowed_lower_asics=preset.shadowed_lower_asics,
        window_px=tuple(preset.window_px),
        window_beam_fraction=preset.window_beam_fraction,
        visible_snr=preset.visible_snr,
        visible_peak_sigma=preset.visible_peak_sigma,
        visible_min_photons=preset.visible_min_photons,
    )


# ------------------------------------------------------------------------------ geometry


def detector_and_beam(shot):
    """dxtbx Detector (one flat panel, fast +x, slow -y, as the CXIDB-76 reader) and Beam."""
    from dxtbx.model import BeamFactory, DetectorFactory

    frame = shot.frame
    px = shot.pixel_size_mm
    detector = DetectorFactory.simple(
        sensor=frame.sensor,
        distance=shot.distance_mm,
        beam_centre=(shot.beam_centre_px[0] * px, shot.beam_centre_px[1] * px),
        fast_direction="+x",
        slow_direction="-y",
        pixel_size=(px, px),
        image_size=(shot.image_shape[1], shot.image_shape[0]),
        trusted_range=(float(shot.min_trusted_value), float(shot.saturated_value)),
        mask=[],
    )
    detector[0].set_name(frame.name)
    beam = BeamFactory.simple(shot.wavelength_A)
    return detector, beam


class _Geometry:
    """Plain numpy view of the shot's dxtbx models, for vectorised projection."""

    def __init__(self, shot):
        detector, beam = detector_and_beam(shot)
        panel = detector[0]
        self.detector, self.beam = detector, beam
        self.s0 = np.array(beam.get_s0())
        self.k0 = 1.0 / shot.wavelength_A
        self.D = np.array(panel.get_D_matrix()).reshape(3, 3)
        self.pixel = shot.pixel_size_mm
        self.distance = shot.distance_mm
        self.beam_centre = shot.beam_centre_px
        self.shape = shot.image_shape
        frame_px = self.pixel
        corners = np.array([[0, 0], [self.shape[1], 0], [0, self.shape[0]], [self.shape[1], self.shape[0]]])
        radii = np.hypot((corners[:, 0] - self.beam_centre[0]) * frame_px, (corners[:, 1] - self.beam_centre[1]) * frame_px)
        self.max_two_theta = math.atan2(radii.max(), self.distance)

    def project(self, s1):
        """Pixel (x, y) of rays s1 (n, 3); NaN where the ray misses the plane."""
        v = s1 @ self.D.T
        with np.errstate(divide="ignore", invalid="ignore"):
            x = v[:, 0] / v[:, 2] / self.pixel
            y = v[:, 1] / v[:, 2] / self.pixel
        bad = v[:, 2] <= 0
        x[bad] = np.nan
        y[bad] = np.nan
        return x, y


# ------------------------------------------------------------------------------ Bragg reflections


def _hash_uniform(hkl, seed):
    """Deterministic uniform(0, 1) per Miller index (a splitmix64 hash), for |F|^2 per crystal form."""
    h = hkl.astype(np.int64)
    x = (h[:, 0] * 73856093) ^ (h[:, 1] * 19349663) ^ (h[:, 2] * 83492791) ^ np.int64(seed)
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


@functools.lru_cache(maxsize=64)
def _space_group(symbol):
    from cctbx import sgtbx

    return sgtbx.space_group_info(symbol).group()


def _systematically_absent(hkl, space_group):
    """Boolean per Miller index: absent by the space group's centring or screw/glide conditions."""
    if not len(hkl):
        return np.zeros(0, dtype=bool)
    from cctbx.array_family import flex

    group = _space_group(space_group)
    columns = [flex.int(np.ascontiguousarray(hkl[:, i], dtype=np.int32)) for i in range(3)]
    return np.array(group.is_sys_absent(flex.miller_index(*columns)), dtype=bool)


def _integers_in(lo, hi):
    """All integers in the closed intervals [lo_i, hi_i] (integer-valued bounds): (owner, value)."""
    lo = lo.astype(np.int64)
    hi = hi.astype(np.int64)
    counts = np.clip(hi - lo + 1, 0, None)
    owner = np.repeat(np.arange(lo.size), counts)
    starts = np.cumsum(counts) - counts
    values = np.repeat(lo, counts) + (np.arange(counts.sum()) - np.repeat(starts, counts))
    return owner, values


def _delta_psi_width(d, crystal, bandwidth, two_theta):
    """Nave (2014) Δψ acceptance d/Ds + η/2 (as DIALS' NaveStillsReflectionPredictor), widened by
    the SASE bandwidth, which moves the Ewald sphere by tanθ·Δλ/λ."""
    eta = math.radians(crystal.mosaic_half_deg)
    return d / crystal.domain_size_A + eta / 2 + np.tan(two_theta / 2) * bandwidth / 2


def predict_reflections(shot, crystal, geometry=None, partiality_floor=0.01, d_min=None):
    """Reflections of ``crystal`` near the Ewald sphere that hit the detector.

    Returns a dict of arrays: hkl (n, 3), d, x, y (pixels), delpsi (rad), partiality, weight
    (relative intensity), two_theta. Positions follow DIALS' StillsRayPredictor (the relp rotated
    about s0 x q onto the sphere)."""
    geometry = geometry or _Geometry(shot)
    model = crystal.model()
    A = np.array(model.get_A()).reshape(3, 3)
    U = np.array(crystal.orientation).reshape(3, 3)
    s0 = geometry.s0
    k0 = geometry.k0
    q_detector = 2 * k0 * math.sin(geometry.max_two_theta / 2)
    if d_min is None:
        d_min = max(0.6 * crystal.resolution_limit_A, 1.0 / q_detector)
    q_max = 1.0 / d_min
    # the relp shell around the Ewald sphere that can still be partially in diffraction
    width_max = (
        _delta_psi_width(d_min, crystal, shot.bandwidth, min(geometry.max_two_theta, 2 * math.asin(min(1.0, q_max / (2 * k0)))))
        * math.sqrt(math.log(1 / partiality_floor) / math.log(2))
    )
    delta = q_max * width_max + 1.0 / crystal.domain_size_A
    F = 2 * k0 * delta + delta * delta
    # walk the two shortest real-space axes, solve along the longest (few (h, k) lines, exact l range)
    real = np.linalg.inv(A)  # rows are the real-space axes a, b, c: h = A^-1 q, so |h_i| <= |a_i| |q|
    lengths = np.linalg.norm(real, axis=1)
    order = np.argsort(lengths)  # solve along order[2], grid over order[0], order[1]
    i0, i1, i2 = order
    n0 = int(math.floor(lengths[i0] * q_max))
    n1 = int(math.floor(lengths[i1] * q_max))
    g0, g1 = np.meshgrid(np.arange(-n0, n0 + 1), np.arange(-n1, n1 + 1), indexing="ij")
    g0 = g0.ravel()
    g1 = g1.ravel()
    col0, col1, col2 = A[:, i0], A[:, i1], A[:, i2]
    p = np.outer(g0, col0) + np.outer(g1, col1) + s0  # (m, 3): relp minus l*c* plus s0
    a2 = col2 @ col2
    b2 = 2 * (p @ col2)
    c2 = np.einsum("ij,ij->i", p, p) - k0 * k0
    disc_out = b2 * b2 - 4 * a2 * (c2 - F)
    ok = disc_out > 0
    root = np.sqrt(np.where(ok, disc_out, 0.0))
    lo_out = np.where(ok, np.ceil((-b2 - root) / (2 * a2)), 1.0)
    hi_out = np.where(ok, np.floor((-b2 + root) / (2 * a2)), 0.0)
    # inside the sphere by more than the shell: excluded, which splits the line into two runs
    disc_in = b2 * b2 - 4 * a2 * (c2 + F)
    inner = ok & (disc_in > 0)
    root_in = np.sqrt(np.where(inner, disc_in, 0.0))
    first_end = np.where(inner, np.floor((-b2 - root_in) / (2 * a2)), hi_out)
    second_start = np.where(inner, np.ceil((-b2 + root_in) / (2 * a2)), hi_out + 1)
    second_start = np.maximum(second_start, first_end + 1)
    owner_a, l_a = _integers_in(lo_out, first_end)
    owner_b, l_b = _integers_in(second_start, hi_out)
    owner = np.concatenate([owner_a, owner_b])
    lvals = np.concatenate([l_a, l_b])
    hkl = np.empty((owner.size, 3), dtype=np.int64)
    hkl[:, i0] = g0[owner]
    hkl[:, i1] = g1[owner]
    hkl[:, i2] = lvals
    q = hkl @ A.T
    qq = np.einsum("ij,ij->i", q, q)
    keep = (qq > 0) & (qq <= q_max * q_max) & (qq < (2 * k0) ** 2)
    hkl, q, qq = hkl[keep], q[keep], qq[keep]
    # cheap per-relp cut before the exact rotation: distance to the sphere ε ≈ |q| cosθ Δψ
    epsilon = np.abs(np.sqrt(np.einsum("ij,ij->i", q + s0, q + s0)) - k0)
    q_len = np.sqrt(qq)
    sin_theta = np.clip(q_len / (2 * k0), 0, 1)
    reach = q_len * _delta_psi_width(1.0 / q_len, crystal, shot.bandwidth, 2 * np.arcsin(sin_theta))
    keep = epsilon <= 1.05 * reach * math.sqrt(math.log(1 / partiality_floor) / math.log(2)) + 1e-12
    hkl, q, qq = hkl[keep], q[keep], qq[keep]
    # DIALS' StillsRayPredictor, vectorised: rotate q about e1 = q x s0 onto the Ewald sphere
    unit_s0 = s0 / np.linalg.norm(s0)
    e1 = np.cross(q, unit_s0)
    e1 /= np.linalg.norm(e1, axis=1)[:, None]
    c0 = np.cross(unit_s0, e1)
    c0 /= np.linalg.norm(c0, axis=1)[:, None]
    a = 0.5 * qq / k0
    b = np.sqrt(np.clip(qq - a * a, 0.0, None))
    r = -a[:, None] * unit_s0 + b[:, None] * c0
    q0 = q / np.sqrt(qq)[:, None]
    q1 = np.cross(q0, e1)
    q1 /= np.linalg.norm(q1, axis=1)[:, None]
    delpsi = -np.arctan2(np.einsum("ij,ij->i", r, q1), np.einsum("ij,ij->i", r, q0))
    s1 = s0 + r
    s1 *= (k0 / np.linalg.norm(s1, axis=1))[:, None]
    d = 1.0 / np.sqrt(qq)
    two_theta = 2 * np.arcsin(np.clip(np.sqrt(qq) / (2 * k0), 0, 1))
    width = _delta_psi_width(d, crystal, shot.bandwidth, two_theta)
    partiality = np.exp(-math.log(2) * (delpsi / width) ** 2)
    x, y = geometry.project(s1)
    on = (partiality >= partiality_floor) & np.isfinite(x)
    on &= (x >= 0) & (x < shot.image_shape[1]) & (y >= 0) & (y < shot.image_shape[0])
    on[on] = ~_systematically_absent(hkl[on], crystal.space_group)
    hkl, d, delpsi, partiality, s1, x, y, two_theta, width = (
        v[on] for v in (hkl, d, delpsi, partiality, s1, x, y, two_theta, width)
    )
    # intensity: |F|^2 ~ Exp(1) per hkl of the crystal form, Wilson fall-off, resolution cut,
    # polarisation (beam polarised along +x, as dxtbx's simple beam)
    structure = -np.log(_hash_uniform(hkl, crystal.structure_seed))
    wilson = np.exp(-crystal.b_factor / (2 * d * d))
    cutoff = 1.0 / (1.0 + np.exp((1.0 / d - 1.0 / crystal.resolution_limit_A) / 0.012))
    unit_s1 = s1 / k0
    polarisation = 1.0 - 0.999 * unit_s1[:, 0] ** 2
    weight = crystal.relative_scale * structure * wilson * cutoff * partiality * polarisation
    return {
        "hkl": hkl,
        "d": d,
        "x": x,
        "y": y,
        "delpsi": delpsi,
        "delpsi_model": width,
        "partiality": partiality,
        "weight": weight,
        "two_theta": two_theta,
    }


# ------------------------------------------------------------------------------ background


def _radial_profiles(shot, r_max_mm, step_mm):
    """Smooth scatter and water-ring photons per pixel versus radius on the detector (1-D tables),
    including obliquity and solid angle (cos^3 2θ); polarisation is applied per pixel."""
    r = np.arange(int(r_max_mm / step_mm) + 2) * step_mm
    two_theta = np.arctan2(r, shot.distance_mm)
    q = 2.0 / shot.wavelength_A * np.sin(two_theta / 2)  # 1/d
    obliquity = np.cos(two_theta) ** 3
    smooth = np.zeros_like(r)
    if shot.air_scatter > 0:  # forward-peaked air scatter (MFX works at 1 atm)
        smooth += shot.air_scatter * np.exp(-two_theta / 0.25)
    if shot.solvent_scatter > 0:
        smooth += shot.solvent_scatter * (0.35 + 0.65 * np.exp(-q / 0.2))
    if shot.kapton:  # the belt scatters a faint diffuse ring near 4.8 Å
        smooth += 0.08 * (shot.solvent_scatter + shot.air_scatter + 1.0) * np.exp(-0.5 * ((q - 0.21) / 0.02) ** 2)
    ring = None
    if shot.water_ring > 0:  # water: main ring at 3.0-3.7 Å, weaker second ring near 2.2 Å
        ring = np.exp(-0.5 * ((q - 1.0 / shot.water_ring_d_A) / 0.026) ** 2)
        ring += 0.35 * np.exp(-0.5 * ((q - 0.46) / 0.04) ** 2)
        ring *= shot.water_ring * obliquity
        ring = ring.astype(np.float32)
    return (smooth * obliquity).astype(np.float32), ring


def _upsample2(coarse, shape):
    """2x2 block upsampling (four strided copies: the cheapest way in numpy)."""
    out = np.empty((coarse.shape[0] * 2, coarse.shape[1] * 2), dtype=np.float32)
    out[0::2, 0::2] = coarse
    out[1::2, 0::2] = coarse
    out[0::2, 1::2] = coarse
    out[1::2, 1::2] = coarse
    if out.shape != tuple(shape):
        out = np.ascontiguousarray(out[: shape[0], : shape[1]])
    return out


def _background(shot, rng, pools):
    """Expected photons per pixel from air, solvent and the water ring, after the Kapton shadow and
    with the jet streak, all behind the beam stop's shadow (float32, full frame). Smooth parts are
    computed on a 2x2-binned grid."""
    slow, fast = shot.image_shape
    if not shot.pulse:
        return np.zeros(shot.image_shape, dtype=np.float32)
    coarse = (-(-slow // 2), -(-fast // 2))
    px = shot.pixel_size_mm
    dx = ((np.arange(coarse[1], dtype=np.float32) * 2 + 1) - np.float32(shot.beam_centre_px[0])) * np.float32(px)
    dy = ((np.arange(coarse[0], dtype=np.float32) * 2 + 1) - np.float32(shot.beam_centre_px[1])) * np.float32(px)
    r_max = math.hypot(max(abs(dx[0]), abs(dx[-1])), max(abs(dy[0]), abs(dy[-1])))
    step = px / 2
    smooth_profile, ring_profile = _radial_profiles(shot, r_max, step)
    dx2 = dx * dx
    r2 = dx2[None, :] + (dy * dy)[:, None]
    index = np.sqrt(r2)
    index *= np.float32(1.0 / step)
    index = index.astype(np.int32)
    # polarisation along +x: 1 - P sin^2(2θ) cos^2(φ) = 1 - P dx^2 / (r^2 + L^2)
    r2 += np.float32(shot.distance_mm**2)
    polarisation = np.divide(dx2[None, :], r2, out=r2)
    polarisation *= np.float32(-0.999)
    polarisation += np.float32(1.0)
    if shot.kapton:  # the belt's shadow dims everything scattered through it
        polarisation *= _kapton_transmission(shot, dx[None, :] / px + shot.beam_centre_px[0],
                                             dy[:, None] / px + shot.beam_centre_px[1])
    smooth = smooth_profile[index]
    ring = ring_profile[index] if ring_profile is not None else None
    grainy = ring is not None and shot.water_ring_grain > 0
    if ring is not None and not grainy:
        smooth += ring  # one upsampling pass for both
    smooth *= polarisation
    background = _upsample2(smooth, shot.image_shape)
    if grainy:
        ring *= polarisation
        ring = _upsample2(ring, shot.image_shape)
        # droplet speckle: multiplicative grain on the ring (CSPAD's small pixels resolve it)
        grain = _normal_field(pools, rng, ring.size).reshape(ring.shape)
        grain *= np.float32(shot.water_ring_grain)
        grain += np.float32(1.0)
        np.maximum(grain, 0.0, out=grain)
        ring *= grain
        background += ring
    if shot.ice_rings:
        background += _ice_rings(shot, rng)
    if shot.jet_streak:
        _add_jet_streak(background, shot)
    if shot.beamstop:  # in front of the detector: it shadows everything scattered, streaks and rings too
        rows, columns = np.ogrid[: shot.image_shape[0], : shot.image_shape[1]]
        background *= _beamstop_transmission(shot, columns + 0.5, rows + 0.5)
    row = _shadowed_rows(shot)
    if row is not None:
        background[row:, :] = 0.0
    return background


# hexagonal ice Ih: d spacings (Å) and rough powder intensities
_ICE_RINGS = ((3.897, 1.0), (3.669, 0.8), (3.441, 0.6), (2.671, 0.25), (2.249, 0.35), (2.072, 0.3), (1.918, 0.2))


def _ice_rings(shot, rng):
    """Sharp powder rings of hexagonal ice (photons per pixel, full frame, float32), computed per pixel:
    at one to two pixels wide, a 2x2-binned profile would draw them as staircases. Each ring's strength
    varies (preferred orientation of the ice); ``grain`` > 0 breaks them into speckle (gamma-distributed,
    mean 1, variance ``grain``, blurred by the detector PSF) as frozen drops of few ice grains do."""
    peak, width, grain = shot.ice_rings
    slow, fast = shot.image_shape
    px = shot.pixel_size_mm
    dx = (np.arange(fast, dtype=np.float32) + np.float32(0.5 - shot.beam_centre_px[0])) * np.float32(px)
    dy = (np.arange(slow, dtype=np.float32) + np.float32(0.5 - shot.beam_centre_px[1])) * np.float32(px)
    r2 = dx[None, :] ** 2 + (dy**2)[:, None]
    two_theta = np.arctan(np.sqrt(r2) / np.float32(shot.distance_mm))
    q = np.sin(two_theta / 2) * np.float32(2.0 / shot.wavelength_A)
    rings = np.zeros(shot.image_shape, dtype=np.float32)
    for (d, strength), jitter in zip(_ICE_RINGS, rng.uniform(0.5, 1.5, len(_ICE_RINGS))):
        rings += np.float32(strength * jitter) * np.exp(-0.5 * ((q - np.float32(1.0 / d)) / np.float32(width)) ** 2)
    polarisation = 1.0 - 0.999 * dx[None, :] ** 2 / (r2 + np.float32(shot.distance_mm**2))
    rings *= np.float32(peak) * np.cos(two_theta) ** 3 * polarisation
    if grain > 0:
        from scipy.ndimage import gaussian_filter

        speckle = rng.gamma(1.0 / grain, grain, size=rings.shape).astype(np.float32)
        if shot.psf_sigma_px > 0.5:  # a phosphor spreads each grain's spot like a Bragg spot
            speckle = gaussian_filter(speckle, shot.psf_sigma_px)
        rings *= speckle
    if shot.kapton:
        rings *= _kapton_transmission(shot, np.arange(fast, dtype=np.float32)[None, :] + np.float32(0.5),
                                     np.arange(slow, dtype=np.float32)[:, None] + np.float32(0.5))
    return rings


def _add_jet_streak(background, shot):
    angle, peak, length, width = shot.jet_streak
    cx, cy = shot.beam_centre_px
    ux, uy = math.cos(math.radians(angle)), -math.sin(math.radians(angle))
    half = int(length) + 4
    x0, x1 = int(max(0, cx - half)), int(min(background.shape[1], cx + half))
    y0, y1 = int(max(0, cy - half)), int(min(background.shape[0], cy + half))
    if x1 <= x0 or y1 <= y0:
        return
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - cx
    ys = np.arange(y0, y1, dtype=np.float32) + 0.5 - cy
    along = xs[None, :] * ux + ys[:, None] * uy
    across = -xs[None, :] * uy + ys[:, None] * ux
    distance = np.maximum(np.abs(along), 10.0)
    streak = peak * (10.0 / distance) ** 1.5 * np.exp(-0.5 * (across / width) ** 2)
    streak *= 1.0 / (1.0 + np.exp((np.abs(along) - length) / 15.0))
    background[y0:y1, x0:x1] += streak.astype(np.float32)


def _transmission_at(shot, x, y):
    """Fraction of X-rays reaching pixel positions (x, y): Kapton belt and beam stop shadows."""
    t = _kapton_transmission(shot, x, y)
    if shot.beamstop:
        t *= _beamstop_transmission(shot, x, y)
    return t


def _beamstop_transmission(shot, x, y):
    """The beam stop's shadow at pixel positions (x, y): a disc round the beam and, if it has one, the
    arm from it to beyond the detector's edge, with a penumbra of ``edge_px``."""
    radius, angle, arm_width, transmission, edge = shot.beamstop
    dx = np.asarray(x, dtype=np.float32) - np.float32(shot.beam_centre_px[0])
    dy = np.asarray(y, dtype=np.float32) - np.float32(shot.beam_centre_px[1])
    inside = np.hypot(dx, dy) - np.float32(radius)  # signed distance to the shadow's edge, < 0 in it
    if arm_width > 0:
        ux, uy = np.float32(math.cos(math.radians(angle))), np.float32(-math.sin(math.radians(angle)))
        across = np.abs(dx * uy - dy * ux) - np.float32(arm_width / 2)
        across = np.where(dx * ux + dy * uy > 0, across, np.float32(np.inf))
        inside = np.minimum(inside, across)
    lit = 1.0 / (1.0 + np.exp(-np.clip(inside / np.float32(edge), -30.0, 30.0)))
    return (transmission + (1.0 - transmission) * lit).astype(np.float32)


def _kapton_transmission(shot, x, y):
    """Fraction of X-rays reaching pixel positions (x, y) through the Kapton belt."""
    t = np.ones(np.broadcast(x, y).shape, dtype=np.float32)
    if shot.kapton:
        angle, offset, transmission = shot.kapton
        nx, ny = -math.sin(math.radians(angle)), math.cos(math.radians(angle))
        side = (x - shot.beam_centre_px[0]) * nx + (y - shot.beam_centre_px[1]) * ny - offset
        side = np.clip(side, -60.0, 60.0)
        t *= (1.0 - (1.0 - transmission) / (1.0 + np.exp(-side / 3.0))).astype(np.float32)
    return t


def _shadowed_rows(shot):
    """Rows (slow) from which the lower ASIC strip is shadowed (LG36), or None."""
    if not (shot.shadowed_lower_asics and shot.family == "cspad"):
        return None
    tiles = np.asarray(shot.frame.active_areas).reshape(-1, 4)
    return int(tiles[:, 0].max())  # the lowest strip of ASICs


# ------------------------------------------------------------------------------ spot rendering


_PATCH_SIZES = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48])


def _spot_sigmas(shot, crystal_of, spots, geometry):
    """Radial and tangential spot widths (pixels): detector PSF, bandwidth, mosaic and domain size."""
    psf = shot.psf_sigma_px
    two_theta = spots["two_theta"]
    scale = geometry.distance / np.cos(two_theta) ** 2 / geometry.pixel  # pixels per radian of 2θ
    bandwidth = 2 * np.tan(two_theta / 2) * shot.bandwidth / 2.355
    mosaic = np.array([math.radians(c.mosaic_half_deg) for c in crystal_of])
    domain = np.array([shot.wavelength_A / c.domain_size_A for c in crystal_of])
    radial = np.sqrt(psf**2 + (scale * bandwidth) ** 2 + (0.5 * scale * mosaic * np.sin(two_theta)) ** 2 + (0.4 * scale * domain) ** 2)
    tangential = np.sqrt(psf**2 + (0.4 * scale * domain) ** 2 + (0.25 * scale * mosaic * np.sin(two_theta)) ** 2)
    return radial, tangential


def _render_spots(field, x, y, photons, radial, tangential, shot):
    """Add Gaussian spots (elongated radially, optional wide phosphor tail) into ``field``."""
    if photons.size == 0:
        return
    slow, fast = field.shape
    flat = field.ravel()
    cx, cy = shot.beam_centre_px
    ux, uy = x - cx, y - cy
    norm = np.hypot(ux, uy)
    norm[norm == 0] = 1.0
    ux, uy = ux / norm, uy / norm
    # pixel-centre sampling of a Gaussian widened by the pixel box (variance + 1/12)
    sr = np.sqrt(radial**2 + 1 / 12)
    st = np.sqrt(tangential**2 + 1 / 12)
    tail_fraction = shot.psf_tail_fraction
    tail_sigma = np.sqrt((shot.psf_tail_scale * shot.psf_sigma_px) ** 2 + 1 / 12)
    half = np.ceil(3.0 * np.maximum(sr, st)).astype(int)
    if tail_fraction > 0:
        tail_peak = tail_fraction * photons / (2 * math.pi * tail_sigma**2)
        reach = tail_sigma * np.sqrt(2 * np.log(np.maximum(tail_peak / 0.1, 1.0)))
        half = np.maximum(half, np.ceil(reach).astype(int))
    sizes = _PATCH_SIZES[np.minimum(np.searchsorted(_PATCH_SIZES, half), _PATCH_SIZES.size - 1)]
    indices, values = [], []
    for size in np.unique(sizes):
        pick = np.flatnonzero(sizes == size)
        offsets = np.arange(-size, size + 1)
        ix = np.floor(x[pick]).astype(np.int64)[:, None] + offsets  # (n, P)
        iy = np.floor(y[pick]).astype(np.int64)[:, None] + offsets
        dx = (ix + 0.5 - x[pick][:, None]).astype(np.float32)  # (n, P)
        dy = (iy + 0.5 - y[pick][:, None]).astype(np.float32)
        if size <= 4:
            # small spots: exact radially elongated Gaussian (the radial streaks of one-pixel spots)
            dxx, dyy = dx[:, None, :], dy[:, :, None]
            pux = ux[pick].astype(np.float32)[:, None, None]
            puy = uy[pick].astype(np.float32)[:, None, None]
            along = dxx * pux + dyy * puy
            across = dyy * pux - dxx * puy
            core = np.exp(-0.5 * ((along / sr[pick].astype(np.float32)[:, None, None]) ** 2 + (across / st[pick].astype(np.float32)[:, None, None]) ** 2))
            core /= core.sum(axis=(1, 2), keepdims=True)
        else:
            # larger (PSF-dominated) spots: separable Gaussian with the elongation projected on x, y
            cos2 = (ux[pick] ** 2)[:, None]
            sin2 = (uy[pick] ** 2)[:, None]
            sx = np.sqrt(sr[pick][:, None] ** 2 * cos2 + st[pick][:, None] ** 2 * sin2).astype(np.float32)
            sy = np.sqrt(sr[pick][:, None] ** 2 * sin2 + st[pick][:, None] ** 2 * cos2).astype(np.float32)
            gx = np.exp(-0.5 * (dx / sx) ** 2)
            gy = np.exp(-0.5 * (dy / sy) ** 2)
            gx /= gx.sum(axis=1, keepdims=True)
            gy /= gy.sum(axis=1, keepdims=True)
            core = gy[:, :, None] * gx[:, None, :]
        profile = core
        if tail_fraction > 0:
            profile *= np.float32(1.0 - tail_fraction)
            tx = np.exp(-0.5 * (dx / np.float32(tail_sigma)) ** 2)
            ty = np.exp(-0.5 * (dy / np.float32(tail_sigma)) ** 2)
            tx /= tx.sum(axis=1, keepdims=True)
            ty /= ty.sum(axis=1, keepdims=True)
            ty *= np.float32(tail_fraction)
            profile += ty[:, :, None] * tx[:, None, :]
        profile *= photons[pick].astype(np.float32)[:, None, None]
        rows = np.broadcast_to(iy[:, :, None], profile.shape)
        cols = np.broadcast_to(ix[:, None, :], profile.shape)
        inside = (rows >= 0) & (rows < slow) & (cols >= 0) & (cols < fast)
        indices.append(rows[inside] * fast + cols[inside])
        values.append(profile[inside])
    if indices:
        # overlapping spots add up: sum duplicates over the touched pixels only (np.add.at is slow)
        index = np.concatenate(indices)
        weights = np.concatenate(values)
        if index.size > flat.size // 16:  # many spots: one pass over the touched range beats sorting
            first = int(index.min())
            summed = np.bincount(index - first, weights=weights)
            flat[first : first + summed.size] += summed.astype(np.float32)
        else:
            touched, inverse = np.unique(index, return_inverse=True)
            flat[touched] += np.bincount(inverse, weights=weights).astype(np.float32)


# ------------------------------------------------------------------------------ noise


_POOL_SIZE = 1 << 23
_TABLE_MAX = 8.0  # photons; above this the normal approximation is used (skewness < 0.36)
_TABLE_BINS_PER_ROOT = 32


@functools.lru_cache(maxsize=1)
def _noise_pools():
    """Fixed pools of standard normals and 16-bit uniforms; each image reads two random windows of
    each (and combines them), which is ~20x faster than drawing 3.7 M fresh normals per image."""
    rng = np.random.default_rng(20180001)
    normal = rng.standard_normal(_POOL_SIZE, dtype=np.float32)
    normal *= np.float32(math.sqrt(0.5))  # two windows are summed per image
    uniform = rng.integers(0, 1 << 16, _POOL_SIZE, dtype=np.uint16)
    # Poisson inverse-CDF table: rows = λ bins (sqrt-spaced), columns = 16-bit uniform levels
    n_bins = int(math.sqrt(_TABLE_MAX) * _TABLE_BINS_PER_ROOT) + 2
    lam = (np.arange(n_bins) / _TABLE_BINS_PER_ROOT) ** 2
    k = np.arange(64)
    log_pmf = k[None, :] * np.log(np.maximum(lam, 1e-300))[:, None] - lam[:, None] - np.cumsum(np.log(np.maximum(k, 1)))[None, :]
    cdf = np.cumsum(np.exp(log_pmf), axis=1)
    cdf[0] = 1.0  # λ = 0: always zero photons
    levels = (np.arange(1 << 16) + 0.5) / (1 << 16)
    table = np.empty((n_bins, 1 << 16), dtype=np.uint8)
    for i in range(n_bins):
        table[i] = np.minimum(np.searchsorted(cdf[i], levels), 255)
    return normal, uniform, table.ravel()


def _window(pool, rng, n):
    if n > pool.size:
        raise SimulationError(f"image of {n} pixels is larger than the noise pool ({pool.size})")
    start = int(rng.integers(0, pool.size - n + 1))
    return pool[start : start + n]


def _normal_field(pools, rng, n):
    normal = pools[0]
    return _window(normal, rng, n) + _window(normal, rng, n)


def _table_poisson(lam, rng, pools):
    """Poisson counts for λ <= 16 by inverse-CDF table lookup with 16-bit uniforms."""
    uniform, table = pools[1], pools[2]
    u = _window(uniform, rng, lam.size) ^ _window(uniform, rng, lam.size)
    index = np.sqrt(lam)
    index *= np.float32(_TABLE_BINS_PER_ROOT)
    index += np.float32(0.5)
    index = index.astype(np.int32)
    index <<= 16
    index += u
    return table[index]


def _normal_counts(values, rng, pools):
    counts = np.sqrt(values)
    counts *= _normal_field(pools, rng, values.size)
    counts += values
    np.maximum(counts, 0.0, out=counts)
    return counts


def _photon_counts(lam, rng, pools, exact_below=_TABLE_MAX):
    """Noisy photon counts (float32) for expected counts ``lam`` (float32, any shape): exact Poisson
    (table inversion) up to ``exact_below`` photons (<= _TABLE_MAX), the normal approximation above.
    The minority regime is handled on its pixel subset, the majority on the whole frame."""
    flat = lam.ravel()
    low = flat <= np.float32(min(exact_below, _TABLE_MAX))
    n_low = int(np.count_nonzero(low))
    if n_low == flat.size:
        return _table_poisson(flat, rng, pools).astype(np.float32).reshape(lam.shape)
    if n_low == 0:
        return _normal_counts(flat, rng, pools).reshape(lam.shape)
    if n_low < flat.size // 2:
        counts = _normal_counts(flat, rng, pools)
        index = np.flatnonzero(low)
        counts[index] = _table_poisson(flat[index], rng, pools)
    else:
        counts = _table_poisson(np.minimum(flat, np.float32(_TABLE_MAX)), rng, pools).astype(np.float32)
        index = np.flatnonzero(~low)
        counts[index] = _normal_counts(flat[index], rng, pools)
    return counts.reshape(lam.shape)


def _correlate(noise):
    """[1, 2, 1] x [1, 2, 1] / 16 smoothing in place: the phosphor's correlated noise (edges keep 3/4).
    Separable sums of shifted views, in torch (3x faster than the same numpy code, identical values)."""
    t = torch.from_numpy(noise)
    pairs = t[:-1] + t[1:]
    out = torch.empty_like(t)
    torch.add(pairs[:-1], pairs[1:], out=out[1:-1])
    out[0] = pairs[0] + t[0]
    out[-1] = pairs[-1] + t[-1]
    pairs = out[:, :-1] + out[:, 1:]
    torch.add(pairs[:, :-1], pairs[:, 1:], out=t[:, 1:-1])
    t[:, 0] = pairs[:, 0] + out[:, 0]
    t[:, -1] = pairs[:, -1] + out[:, -1]
    t.mul_(1 / 16)
    return noise


# ------------------------------------------------------------------------------ visibility


def _visibility_thresholds(shot, spots, radial, tangential, background_at, low_gain):
    """Photons a spot needs to be 'visible' (docs/simulator.md): at least visible_min_photons, a
    matched-filter SNR >= visible_snr over its effective area, and a peak pixel visible_peak_sigma
    above the per-pixel noise. Background and read noise in photons; the read noise includes the
    rounding of each pixel to a whole ADU (variance 1/12 ADU^2; one step is factor ADU in a low-gain
    zone), which at a fraction of an ADU per photon hides spots as surely as read noise does (not on a
    photon counter: its counts are whole photons)."""
    step = np.where(low_gain, shot.low_gain_factor, 1.0) / max(shot.adu_per_photon, 1e-6)  # photons per step
    rounding = 0.0 if shot.frame.photon_counting else 1 / 12  # a photon counter's counts are whole already
    read = step * np.sqrt(shot.read_noise_adu**2 + rounding)
    sr = np.sqrt(radial**2 + 1 / 12)
    st = np.sqrt(tangential**2 + 1 / 12)
    area = 4 * math.pi * sr * st * (1.0 + shot.psf_tail_fraction)
    core = 1.0 - shot.psf_tail_fraction
    from scipy.special import erf

    peak_fraction = core * erf(0.5 / (math.sqrt(2) * sr)) * erf(0.5 / (math.sqrt(2) * st))
    snr_need = shot.visible_snr * np.sqrt(area * (background_at + read**2) + 1.0)
    peak_need = shot.visible_peak_sigma * np.sqrt(background_at + read**2 + 0.25) / peak_fraction
    return np.maximum(np.maximum(snr_need, peak_need), shot.visible_min_photons)


def _spot_boxes(x, y, radial, tangential, field_shape):
    """Square pixel boxes (+-2 sigma, 1-8 px) around spots, grouped by size: a list of (flat indices
    (n, P), index into the spots (n,)); pixels off the image are clipped onto its edge."""
    slow, fast = field_shape
    half = np.clip(np.ceil(2.0 * np.sqrt(np.maximum(radial, tangential) ** 2 + 1 / 12)), 1, 8).astype(int)
    boxes = []
    for size in np.unique(half):
        pick = np.flatnonzero(half == size)
        offsets = np.arange(-size, size + 1)
        rows = np.clip(np.floor(y[pick]).astype(np.int64)[:, None] + offsets, 0, slow - 1)
        cols = np.clip(np.floor(x[pick]).astype(np.int64)[:, None] + offsets, 0, fast - 1)
        boxes.append(((rows[:, :, None] * fast + cols[:, None, :]).reshape(pick.size, -1), pick))
    return boxes


def _realised_photons(photons, boxes, background_boxes, mean_boxes, observed_boxes):
    """The photons each spot shows in this image: its expected photons scaled by a matched filter of the
    drawn pixels over its expected profile (the excess of the noise-free image over the background in
    its box): unbiased, with the noise of the criterion's matched filter, variance (B + r^2) over the
    effective area 4 pi sigma^2, plus the spot's own photon noise."""
    realised = np.array(photons, dtype=np.float64)
    for (_, pick), background, mean, observed in zip(boxes, background_boxes, mean_boxes, observed_boxes):
        profile = np.maximum(mean - background, 0).astype(np.float64)
        norm = (profile * profile).sum(axis=1)
        scale = (profile * (observed - background)).sum(axis=1) / np.maximum(norm, 1e-30)
        realised[pick] = np.where(norm > 0, photons[pick] * scale, 0.0)
    return realised


def _solve_brightness(thresholds, weights, counted, target, rng, max_photons=2.0e6):
    """Brightness (photons per unit weight) that makes exactly ``target`` counted spots visible."""
    scale_needed = np.sort(thresholds[counted] / np.maximum(weights[counted], 1e-30))
    cap = max_photons / max(float(weights.max()) if weights.size else 1.0, 1e-30)
    if scale_needed.size == 0:
        return float(min(cap, 1e3))
    if target <= 0:
        return float(scale_needed[0] * rng.uniform(0.15, 0.95))
    if target >= scale_needed.size:
        return float(min(cap, scale_needed[-1] * rng.uniform(1.0, 1.5)))
    low, high = scale_needed[target - 1], scale_needed[target]
    if high <= low:
        return float(min(cap, low))
    return float(min(cap, math.exp(rng.uniform(math.log(low), math.log(high)))))


# ------------------------------------------------------------------------------ simulate_still


def _low_gain_radius_px(shot):
    if not shot.low_gain_d_A:
        return None
    sin_theta = shot.wavelength_A / (2 * shot.low_gain_d_A)
    if sin_theta >= 1:
        return None
    return shot.distance_mm * math.tan(2 * math.asin(sin_theta)) / shot.pixel_size_mm


def simulate_still(shot, rng):
    """Render ``shot``: the raw int32 image exactly as it would be written, mask and truth."""
    pools = _noise_pools()
    frame = shot.frame
    slow, fast = shot.image_shape
    geometry = _Geometry(shot)

    # --- expected photons: background and artefacts
    lam = _background(shot, rng, pools)
    if shot.pulse and frame.border is not None and shot.asic_border_excess > 0:
        flat = lam.ravel()
        flat[frame.border] *= np.float32(1.0 + shot.asic_border_excess)

    # --- Bragg reflections of every crystal
    parts, crystal_of = [], []
    if shot.pulse:
        for crystal in shot.crystals:
            spots = predict_reflections(shot, crystal, geometry)
            parts.append(spots)
            crystal_of.extend([crystal] * spots["x"].size)
    keys = ("hkl", "d", "x", "y", "weight", "two_theta")
    if parts:
        spots = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    else:
        spots = {k: np.zeros((0, 3) if k == "hkl" else 0) for k in keys}
    lattice = np.concatenate([np.full(p["x"].size, i) for i, p in enumerate(parts)]) if parts else np.zeros(0, int)
    radial, tangential = _spot_sigmas(shot, crystal_of, spots, geometry)
    transmission = _transmission_at(shot, spots["x"], spots["y"])
    row = _shadowed_rows(shot)
    ix = np.clip(spots["x"].astype(int), 0, fast - 1)
    iy = np.clip(spots["y"].astype(int), 0, slow - 1)
    if row is not None:
        transmission[iy >= row] = 0.0
    weights = spots["weight"] * transmission

    # --- background seen by each spot (already dimmed by the same shadows as the spots)
    background = lam
    background_at = background[iy, ix].astype(np.float64)
    low_gain_radius = _low_gain_radius_px(shot)
    cx, cy = shot.beam_centre_px
    if low_gain_radius:
        low_gain = np.hypot(spots["x"] - cx, spots["y"] - cy) < low_gain_radius
    else:
        low_gain = np.zeros(spots["x"].size, dtype=bool)
    thresholds = _visibility_thresholds(shot, spots, radial, tangential, background_at, low_gain)
    x0, x1, y0, y1 = shot.expert_window()
    good = frame.static_mask[iy, ix] & (transmission > 0.05) if spots["x"].size else np.zeros(0, bool)
    in_window = (spots["x"] >= x0) & (spots["x"] < x1) & (spots["y"] >= y0) & (spots["y"] < y1)

    brightness = shot.brightness
    if brightness is None:
        if shot.target_visible_spots is not None and spots["x"].size:
            brightness = _solve_brightness(thresholds, weights, good & in_window, shot.target_visible_spots, rng)
        else:
            brightness = 0.0
    photons = brightness * weights
    visible = good & (photons >= thresholds)
    # reflections near the criterion: whether the drawn image shows them depends on its noise (measured
    # below, kept beside the label as a measure of how far the image can tell it)
    near = np.flatnonzero(good & (photons >= 0.2 * thresholds) & (photons < 5.0 * thresholds))
    boxes = _spot_boxes(spots["x"][near], spots["y"][near], radial[near], tangential[near], field_shape=lam.shape)
    background_boxes = [lam.ravel()[index] for index, _ in boxes]

    # --- render the spots that carry light (brightest first if there are very many)
    drawn = np.flatnonzero(photons >= 1.0)
    if drawn.size > 6000:
        drawn = drawn[np.argsort(photons[drawn])[::-1][:6000]]
    field = background
    _render_spots(field, spots["x"][drawn], spots["y"][drawn], photons[drawn], radial[drawn], tangential[drawn], shot)
    field.ravel()[frame.inactive_index] = 0.0
    mean_boxes = [field.ravel()[index] for index, _ in boxes]

    # --- detection: photons, gain, read noise, offsets, saturation
    # the phosphor's correlation averages ~7 pixels' noise: the normal approximation is fine from 3 photons
    exact_below = 3.0 if shot.family == "rayonix" else _TABLE_MAX
    counts = _photon_counts(field, rng, pools, exact_below) if shot.pulse else np.zeros_like(field)
    if shot.family == "rayonix" and shot.pulse:
        counts -= field
        counts = _correlate(counts)
        counts += field
    adu = counts
    adu *= np.float32(shot.adu_per_photon)
    if shot.read_noise_adu > 0:
        read = _normal_field(pools, rng, adu.size).reshape(adu.shape)
        read *= np.float32(shot.read_noise_adu)
        adu += read
    if shot.pulse:
        # as the image will show them: rounded to whole ADU (the pedestal only shifts the rounding)
        observed = [np.rint(adu.ravel()[index]) / np.float32(max(shot.adu_per_photon, 1e-6)) for index, _ in boxes]
        realised = _realised_photons(photons[near], boxes, background_boxes, mean_boxes, observed)
    else:
        realised = photons[near]
    shown = photons.astype(np.float64)  # photons as the image shows them
    shown[near] = realised
    visible_in_image = good & (shown >= thresholds)
    if shot.pedestal_adu:
        adu += np.float32(shot.pedestal_adu)
    if shot.common_mode_sigma_adu > 0 and frame.active_areas:
        # per-tile residual of the dark subtraction (common mode), tile by tile through slices
        tiles = np.asarray(frame.active_areas).reshape(-1, 4)
        offsets = rng.normal(0.0, shot.common_mode_sigma_adu, len(tiles)).astype(np.float32)
        for (s0, f0, s1, f1), offset in zip(tiles, offsets):
            adu[s0:s1, f0:f1] += offset
    if low_gain_radius:
        # low-gain pixels record photons / factor ADU; the converter multiplies them back by factor
        r0 = int(max(0, cy - low_gain_radius)), int(min(slow, cy + low_gain_radius + 1))
        c0 = int(max(0, cx - low_gain_radius)), int(min(fast, cx + low_gain_radius + 1))
        sub = adu[r0[0] : r0[1], c0[0] : c0[1]]
        rr = np.arange(r0[0], r0[1])[:, None] + 0.5 - cy
        cc = np.arange(c0[0], c0[1])[None, :] + 0.5 - cx
        zone = rr * rr + cc * cc < low_gain_radius**2
        factor = np.float32(shot.low_gain_factor)
        extra = _normal_field(pools, rng, sub.size).reshape(sub.shape) * np.float32(shot.read_noise_adu)
        sub[zone] = np.rint(sub[zone] / factor + extra[zone]) * factor
    np.rint(adu, out=adu)
    low = shot.min_trusted_value if frame.family == "cspad" else 0
    torch.from_numpy(adu).clamp_(min(low - 1000, 0) if frame.family == "cspad" else 0, shot.saturated_value)
    image = adu.astype(np.int32)
    image.ravel()[frame.inactive_index] = frame.gap_value

    n_visible = int(np.count_nonzero(visible & in_window))
    crystal_limit = min((c.resolution_limit_A for c in shot.crystals), default=None) if shot.pulse else None
    truth = {
        "label": label_for_count(n_visible),
        "n_visible_spots": n_visible,
        "n_spots_total": int(np.count_nonzero(visible)),
        "n_visible_in_image": int(np.count_nonzero(visible_in_image & in_window)),
        "crystal_present": bool(shot.crystals) and shot.pulse,
        "n_lattices": len(shot.crystals) if shot.pulse else 0,
        "resolution_limit_A": crystal_limit,
        "visible_resolution_A": float(spots["d"][visible].min()) if np.any(visible) else None,
        "brightness": float(brightness),
        "target_visible_spots": shot.target_visible_spots,
        "intended_label": shot.intended_label,
        "artefacts": shot.artefacts,
        "blank": not shot.pulse,
    }
    return Still(
        image=image,
        mask=frame.static_mask.copy(),
        beam_centre_px=shot.beam_centre_px,
        pixel_size_mm=shot.pixel_size_mm,
        distance_mm=shot.distance_mm,
        wavelength_A=shot.wavelength_A,
        family=shot.family,
        truth=truth,
        shot=shot,
        spots={
            "hkl": spots["hkl"],
            "x": spots["x"],
            "y": spots["y"],
            "d": spots["d"],
            "photons": photons,
            "realised_photons": shown,
            "visible": visible,
            "visible_in_image": visible_in_image,
            "visibility_threshold": thresholds,
            "in_window": in_window,
            "lattice": lattice,
        },
    )


# ------------------------------------------------------------------------------ runs


TRUTH_COLUMNS = (
    "image",
    "file",
    "index",
    "label",
    "n_visible_spots",
    "n_spots_total",
    "crystal_present",
    "n_lattices",
    "resolution_limit_A",
    "visible_resolution_A",
    "brightness",
    "intended_label",
    "family",
    "distance_mm",
    "wavelength_A",
    "artefacts",
)


def image_rng(seed, index):
    """The per-image generator: any subset of a run, with any nproc, gives identical images."""
    return np.random.default_rng([int(seed), int(index)])


def simulate_image(preset, seed, index, randomise=False, vary_beam_centre=False):
    """Shot ``index`` of the run with ``seed``: the same Still whichever process draws it."""
    rng = image_rng(seed, index)
    shot = sample_shot(preset, rng, randomise=randomise, vary_beam_centre=vary_beam_centre)
    return simulate_still(shot, rng)


def _writer_kwargs(layout, frame, preset, chunk_size):
    beam_mm = (frame.beam_centre_px[0] * frame.pixel_size_mm, frame.beam_centre_px[1] * frame.pixel_size_mm)
    trusted = dict(min_trusted_value=preset.min_trusted_value, saturated_value=preset.saturated_value)
    if layout == "raw_cspad":
        return dict(beam_center_mm=beam_mm, chunk_size=chunk_size, **trusted)
    if layout == "rayonix_binned":
        return dict(
            binning=2,
            native_pixel_size_mm=frame.pixel_size_mm / 2,
            image_shape=frame.shape,
            beam_center_mm=beam_mm,
            hole_radius_px=frame.hole_radius_px,
            chunk_size=chunk_size,
            **trusted,
        )
    return dict(
        image_shape=frame.shape,
        pixel_size_mm=frame.pixel_size_mm,
        beam_center_mm=beam_mm,
        active_areas=list(frame.active_areas) if frame.active_areas else None,
        chunk_size=chunk_size,
        **trusted,
    )




def check_run_parameters(preset, n_images, seed, directory, layout, randomise, nproc):
    """Raise SimulationError (one message for every problem) before anything is written."""
    problems = []
    if not isinstance(n_images, (int, np.integer)) or n_images < 1:
        problems.append(f"n_images must be a positive integer, got {n_images!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(nproc, (int, np.integer)) or nproc < 1:
        problems.append(f"nproc must be at least 1, got {nproc!r}")
    if layout not in LAYOUT_FAMILIES:
        problems.append(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_FAMILIES)}")
    else:
        allowed = LAYOUT_FAMILIES[layout]
        if allowed and randomise:
            problems.append(f"randomise=True draws every detector family; layout {layout} holds only {allowed[0]} images: use layout=idh5")
        elif allowed and preset.family not in allowed:
            problems.append(f"layout {layout} holds {allowed[0]} images but preset {preset.name} is a {preset.family} detector; use layout=idh5")
    if directory is None or str(directory).strip() == "":
        problems.append("an output directory is needed")
    else:
        directory = os.path.abspath(str(directory))
        parent = directory
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"cannot write to output directory {directory}: {parent} is not a writable directory")
    if problems:
        raise SimulationError("; ".join(problems))


def simulate_run(
    preset,
    n_images,
    seed,
    directory,
    layout="idh5",
    randomise=False,
    nproc=1,
    chunk_size=1000,
    prefix=None,
    progress=None,
):
    """Simulate ``n_images`` shots and write them into ``directory``.

    Writes the image file(s) (one per detector family; ``<prefix>.h5``, or ``<prefix>_<family>.h5``
    with ``randomise=True``), ``expert_annotation.txt`` (fv5080 format, paths relative to it) and
    ``truth.csv``. Image ``i`` uses ``np.random.default_rng([seed, i])``, so any subset and any
    ``nproc`` give byte-identical images. ``progress(done, total, images_per_s)`` is called as
    images arrive. Returns a summary dict (files, label counts, seconds, images_per_s).
    """
    from dials_cnn.annotations import write_annotations
    from dials_cnn.fileio import atomic_write

    if isinstance(preset, str):
        preset = get_preset(preset)
    presets_module.check_preset(preset)
    check_run_parameters(preset, n_images, seed, directory, layout, randomise, nproc)
    directory = os.path.abspath(str(directory))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise SimulationError(f"cannot create output directory {directory}: {error.strerror}") from None
    if prefix is None:
        prefix = f"{'random' if randomise else preset.name}_seed{seed}"

    import contextlib

    from dials_cnn import layouts

    writers = {}
    file_counts = {}
    records, truth_rows = [], []
    counts = dict.fromkeys(LABELS, 0)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:

        def writer_for(family):
            if family not in writers:
                frame = detector_frame(family)
                name = f"{prefix}.h5" if not randomise else f"{prefix}_{family}.h5"
                family_preset = preset
                if randomise:
                    low, high = _FAMILY_TRUSTED[family]
                    family_preset = dataclasses.replace(preset, min_trusted_value=low, saturated_value=high)
                kwargs = _writer_kwargs(layout, frame, family_preset, chunk_size)
                writers[family] = (name, stack.enter_context(layouts.open_writer(layout, os.path.join(directory, name), **kwargs)))
                file_counts[name] = 0
            return writers[family]

        for done, (index, still) in enumerate(_iterate_stills(preset, seed, n_images, randomise, nproc), start=1):
            name, writer = writer_for(still.family)
            if layout == "raw_cspad":
                from dials_cnn import cspad

                writer.append(cspad.disassemble(still.image), still.distance_mm, still.wavelength_A)
            else:
                writer.append(still.image, still.distance_mm, still.wavelength_A)
            position = file_counts[name]
            file_counts[name] += 1
            truth = still.truth
            counts[truth["label"]] += 1
            records.append((name, position, truth["label"]))
            truth_rows.append(
                {
                    "image": index,
                    "file": name,
                    "index": position + 1,
                    "label": truth["label"],
                    "n_visible_spots": truth["n_visible_spots"],
                    "n_spots_total": truth["n_spots_total"],
                    "crystal_present": int(truth["crystal_present"]),
                    "n_lattices": truth["n_lattices"],
                    "resolution_limit_A": "" if truth["resolution_limit_A"] is None else "%.3f" % truth["resolution_limit_A"],
                    "visible_resolution_A": "" if truth["visible_resolution_A"] is None else "%.3f" % truth["visible_resolution_A"],
                    "brightness": "%.6g" % truth["brightness"],
                    "intended_label": truth["intended_label"],
                    "family": still.family,
                    "distance_mm": "%.3f" % still.distance_mm,
                    "wavelength_A": "%.6f" % still.wavelength_A,
                    "artefacts": ";".join(truth["artefacts"]),
                }
            )
            if progress is not None:
                elapsed = time.perf_counter() - start
                progress(done, n_images, done / elapsed if elapsed > 0 else float("inf"))
        annotation = os.path.join(directory, "expert_annotation.txt")
        write_annotations(annotation, records)
        with atomic_write(os.path.join(directory, "truth.csv"), newline="") as handle:
            table = csv.DictWriter(handle, fieldnames=TRUTH_COLUMNS)
            table.writeheader()
            table.writerows(truth_rows)
    seconds = time.perf_counter() - start
    return {
        "directory": directory,
        "files": sorted(file_counts),
        "annotation": annotation,
        "truth": os.path.join(directory, "truth.csv"),
        "counts": counts,
        "seconds": seconds,
        "images_per_s": n_images / seconds if seconds > 0 else float("inf"),
    }


_RUN = {}


def _init_worker(preset, seed, randomise):
    torch.set_num_threads(1)  # one core per worker process
    _RUN.update(preset=preset, seed=seed, randomise=randomise)


def _worker_image(index):
    still = simulate_image(_RUN["preset"], _RUN["seed"], index, _RUN["randomise"])
    still.shot = None  # keep what goes back through the pipe small
    still.spots = None
    return index, still


def _iterate_stills(preset, seed, n_images, randomise, nproc):
    keep_freed_memory()  # a still's full-frame arrays are reused, not page-faulted in again (memory.py)
    if nproc <= 1:
        for index in range(n_images):
            yield index, simulate_image(preset, seed, index, randomise)
        return
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with context.Pool(nproc, initializer=_init_worker, initargs=(preset, seed, randomise)) as pool:
        yield from pool.imap(_worker_image, range(n_images), chunksize=1)


# ------------------------------------------------------------------------------ display


def viewer_display(image, mask=None, contrast=0.4):
    """Grey levels as dials.image_viewer and the paper's figures show them (paper Fig. 6):
    D = min(1, M * P / P90) with P90 the 90th-percentile pixel, M the contrast; 0 white, 1 black."""
    values = np.asarray(image, dtype=np.float32)
    good = values[mask] if mask is not None else values.ravel()
    p90 = float(np.percentile(good, 90)) if good.size else 1.0
    display = np.clip(values, 0, None) * np.float32(contrast / max(p90, 1.0))
    return np.minimum(display, 1.0)


def expert_window_view(still, contrast=0.4, binning=2, reduce=None):
    """The expert's inspection window of ``still`` as display grey levels (white = 0, black = 1),
    binned: by the maximum on CSPAD-like detectors so that one-pixel spots survive, by the mean on
    the Rayonix whose spots are broad (``reduce`` = "max" or "mean" overrides)."""
    x0, x1, y0, y1 = (int(round(v)) for v in still.shot.expert_window())
    display = viewer_display(still.image, still.mask, contrast)
    slow, fast = display.shape
    window = np.zeros((y1 - y0, x1 - x0), dtype=np.float32)
    ys, xs = slice(max(y0, 0), min(y1, slow)), slice(max(x0, 0), min(x1, fast))
    window[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0] = display[ys, xs]
    h, w = (window.shape[0] // binning) * binning, (window.shape[1] // binning) * binning
    blocks = window[:h, :w].reshape(h // binning, binning, w // binning, binning)
    reduce = reduce or ("mean" if still.family == "rayonix" else "max")
    return blocks.max(axis=(1, 3)) if reduce == "max" else blocks.mean(axis=(1, 3))
