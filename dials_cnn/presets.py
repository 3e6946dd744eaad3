"""Simulation presets for the five LCLS runs of the paper (Ke et al. 2018, Table 1; REFERENCE §2-4).

A :class:`Preset` holds the distributions ``dials_cnn.simulate.sample_shot`` draws each shot's
parameters from: beam, crystal form, detector response, background and delivery artefacts, and the
class proportions of the expert's annotation. Ranges are ``(low, high)`` tuples drawn uniformly (or
log-uniformly where noted in ``simulate.sample_shot``). Every field can be overridden with
:func:`override` (what ``dials.cnn_simulate preset_override...`` does).

Numbers that come from the paper or fv5080 are marked (paper) / (fv5080); the rest are plausible
values for these instruments chosen so that the images look like the paper's figures.
"""

import dataclasses
from typing import Optional, Tuple

#: Expert class counts per 2000 images (HIT, MAYBE, MISS), fv5080 annotations (REFERENCE §3).
FV5080_CLASS_COUNTS = {
    "L498": (148, 498, 1354),
    "LG36": (235, 57, 1708),
    "LN84": (806, 132, 1062),
    "LN83": (346, 63, 1591),
    "LO19": (730, 151, 1119),
}

FAMILIES = ("cspad", "rayonix", "pilatus", "eiger")


class PresetError(ValueError):
    """An unknown preset or a bad override; the message says what is allowed."""


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    family: str  # detector family: cspad | rayonix | pilatus | eiger
    # beam
    energy_keV: float
    bandwidth: float = 0.0025  # fractional FWHM of the SASE spectrum
    # crystal form
    unit_cell: Tuple[float, ...] = (100.0, 100.0, 100.0, 90.0, 90.0, 90.0)
    space_group: str = "P 21 21 21"
    # geometry
    distance_mm: float = 120.0
    distance_jitter_mm: float = 0.5
    beam_jitter_px: float = 1.5
    # detector response; gain is the DIALS spot-finder gain (variance / mean of the ADU of a pixel)
    gain: float = 1.0
    read_noise_adu: float = 1.0
    pedestal_adu: float = 0.0
    min_trusted_value: int = -10
    saturated_value: int = 65535
    psf_sigma_px: Tuple[float, float] = (0.3, 0.5)  # core Gaussian sigma of a spot
    psf_tail_fraction: float = 0.0  # share of a spot's photons in a wide tail (phosphor halo)
    psf_tail_scale: float = 4.0  # tail sigma / core sigma
    # crystals
    mosaic_half_deg: Tuple[float, float] = (0.02, 0.1)
    domain_size_A: Tuple[float, float] = (1500.0, 5000.0)
    b_factor: Tuple[float, float] = (20.0, 50.0)
    resolution_limit_A: Tuple[float, float] = (2.0, 4.0)
    multi_lattice_probability: float = 0.0
    max_lattices: int = 3
    # expert classes (HIT, MAYBE, MISS) and what misses are made of
    class_fractions: Tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    hit_spots_median: float = 40.0  # visible spots in the window of a typical HIT (log-normal)
    hit_spots_spread: float = 1.0  # natural-log sigma
    miss_weak_crystal_fraction: float = 0.3  # misses with a crystal showing 0-3 visible spots
    blank_fraction: float = 0.01  # shots without an X-ray pulse: dark noise only (of all shots)
    sample_miss_fraction: float = 0.2  # misses where the sample stream missed the beam (no water ring)
    # background, in photons per pixel for a 0.11 mm pixel at 100 mm (scaled by solid angle)
    air_scatter: Tuple[float, float] = (0.0, 0.0)
    solvent_scatter: Tuple[float, float] = (0.5, 2.0)
    water_ring: Tuple[float, float] = (1.0, 6.0)
    water_ring_d_A: Tuple[float, float] = (3.1, 3.4)
    water_ring_grain: float = 0.0  # 0 smooth .. 1 very grainy (speckled droplets)
    # delivery artefacts
    jet_streak_probability: float = 0.0
    jet_streak_angle_deg: float = 0.0  # streak direction in the image, degrees from +fast
    kapton_probability: float = 0.0
    kapton_transmission: Tuple[float, float] = (0.7, 0.9)
    kapton_angle_deg: float = 90.0  # edge direction of the shadowed half-plane
    # frozen samples: sharp powder rings of hexagonal ice (3.90, 3.67, 3.44, 2.67, 2.25 ... Å)
    ice_ring_probability: float = 0.0
    ice_ring_photons: Tuple[float, float] = (0.05, 30.0)  # photons per pixel on the strongest ring
    ice_ring_width: Tuple[float, float] = (0.0008, 0.004)  # Gaussian sigma in 1/d (1/Å)
    # the beam stop's shadow (a disc round the beam and often the arm that holds it; synchrotron
    # photon counters nearly always have one, unmasked at the time of collection)
    beamstop_probability: float = 0.0
    beamstop_radius_mm: Tuple[float, float] = (0.5, 4.0)  # log-uniform
    beamstop_arm_probability: float = 0.7
    beamstop_arm_width_mm: Tuple[float, float] = (0.3, 1.5)
    beamstop_transmission: Tuple[float, float] = (0.003, 0.15)  # log-uniform: air scatter behind the stop
    # CSPAD specifics
    asic_border_excess: float = 0.0  # extra signal of the double pixel lines between ASICs
    common_mode_sigma_adu: float = 0.0  # per-ASIC residual offset after dark subtraction
    low_gain_d_A: Optional[float] = None  # pixels at lower resolution than this read in low gain
    low_gain_factor: float = 7.0
    shadowed_lower_asics: bool = False  # the lower ASIC strip sees no X-rays (LG36)
    # the expert's inspection window (paper §3.3.1) and the visibility criterion
    window_px: Tuple[int, int] = (945, 520)  # (width=fast, height=slow)
    window_beam_fraction: float = 0.85  # beam at this fraction of the window height (lower centre)
    visible_snr: float = 5.0
    visible_peak_sigma: float = 2.0
    visible_min_photons: float = 4.0

    @property
    def wavelength_A(self):
        return 12.398419843320026 / self.energy_keV


def _cspad(**kwargs):
    defaults = dict(
        family="cspad",
        min_trusted_value=-50,
        saturated_value=15000,
        psf_sigma_px=(0.25, 0.55),
        read_noise_adu=3.0,
        asic_border_excess=1.2,
        common_mode_sigma_adu=1.5,
        air_scatter=(0.0, 0.05),  # CXI is in vacuum
        water_ring_grain=0.15,  # droplet speckle on top of the shot noise
    )
    defaults.update(kwargs)
    return Preset(**defaults)


def _rayonix(**kwargs):
    defaults = dict(
        family="rayonix",
        min_trusted_value=0,
        saturated_value=65535,
        psf_sigma_px=(0.9, 1.5),
        psf_tail_fraction=0.12,
        psf_tail_scale=5.0,
        read_noise_adu=1.5,
        pedestal_adu=0.0,
        air_scatter=(10.0, 40.0),  # MFX at 1 atm: strong air scatter near the beam
        water_ring_grain=0.0,
    )
    defaults.update(kwargs)
    return Preset(**defaults)


def _fractions(name):
    counts = FV5080_CLASS_COUNTS[name]
    return tuple(c / sum(counts) for c in counts)


PRESETS = {
    "L498": _cspad(
        name="L498",
        description="thermolysin, CSPAD at CXI, MESH jet (run 27): sparse, often one-pixel spots",
        energy_keV=9.773,  # (paper)
        unit_cell=(93.0, 93.0, 130.0, 90.0, 90.0, 120.0),  # (paper)
        space_group="P 61 2 2",  # (paper)
        distance_mm=110.0,
        gain=4.55,  # (fv5080)
        psf_sigma_px=(0.2, 0.45),
        mosaic_half_deg=(0.005, 0.04),
        domain_size_A=(3000.0, 10000.0),
        b_factor=(15.0, 35.0),
        resolution_limit_A=(1.8, 3.5),
        class_fractions=_fractions("L498"),
        hit_spots_median=18.0,
        hit_spots_spread=0.5,
        miss_weak_crystal_fraction=0.4,
        sample_miss_fraction=0.15,
        solvent_scatter=(0.3, 1.5),
        water_ring=(0.5, 4.0),
        jet_streak_probability=0.15,
        jet_streak_angle_deg=0.0,
    ),
    "LG36": _cspad(
        name="LG36",
        description="photosystem II, CSPAD at CXI, coMESH jet (run 87): crowded lattices, low-gain core",
        energy_keV=7.088,  # (paper)
        unit_cell=(118.0, 224.0, 331.0, 90.0, 90.0, 90.0),  # (paper)
        space_group="P 21 21 21",  # (paper)
        distance_mm=125.0,
        gain=15.64,  # (fv5080)
        read_noise_adu=4.0,  # ~0.25 photon in high gain, x7 in the low-gain zone
        common_mode_sigma_adu=3.0,
        saturated_value=30000,
        mosaic_half_deg=(0.03, 0.12),
        domain_size_A=(1500.0, 4000.0),
        b_factor=(40.0, 80.0),
        resolution_limit_A=(3.0, 6.0),
        class_fractions=_fractions("LG36"),
        hit_spots_median=80.0,
        hit_spots_spread=0.9,
        miss_weak_crystal_fraction=0.08,
        blank_fraction=0.03,
        sample_miss_fraction=0.55,  # (paper) many misses show neither spots nor a water ring
        solvent_scatter=(0.2, 1.0),
        water_ring=(0.3, 3.0),
        jet_streak_probability=0.1,
        jet_streak_angle_deg=0.0,
        low_gain_d_A=3.2,  # (paper) inner zone in low gain, scaled by ~7
        low_gain_factor=7.0,
        shadowed_lower_asics=True,  # (paper)
    ),
    "LN84": _rayonix(
        name="LN84",
        description="photosystem II, Rayonix at MFX, conveyor belt (run 95): low-contrast broad spots",
        energy_keV=9.516,  # (paper)
        unit_cell=(118.0, 223.0, 311.0, 90.0, 90.0, 90.0),  # (paper)
        space_group="P 21 21 21",  # (paper)
        distance_mm=170.0,
        gain=0.31,  # (fv5080)
        mosaic_half_deg=(0.05, 0.25),  # smeared layer lines
        domain_size_A=(1000.0, 3000.0),
        b_factor=(50.0, 90.0),
        resolution_limit_A=(3.0, 6.0),
        multi_lattice_probability=0.35,  # (paper) overlapping lattices
        class_fractions=_fractions("LN84"),
        hit_spots_median=70.0,
        hit_spots_spread=0.9,
        miss_weak_crystal_fraction=0.25,
        sample_miss_fraction=0.1,
        air_scatter=(15.0, 45.0),
        solvent_scatter=(5.0, 20.0),
        water_ring=(8.0, 30.0),
        kapton_probability=0.9,
        kapton_transmission=(0.7, 0.85),
        kapton_angle_deg=90.0,
    ),
    "LN83": _rayonix(
        name="LN83",
        description="hydrogenase, Rayonix at MFX, conveyor belt (run 18): bright spots up to ~400 px",
        energy_keV=9.498,  # (paper)
        unit_cell=(73.0, 96.0, 119.0, 90.0, 90.0, 90.0),  # (paper)
        space_group="P 21 21 21",  # (paper)
        distance_mm=140.0,
        gain=0.27,  # (fv5080)
        psf_sigma_px=(0.9, 1.6),
        psf_tail_fraction=0.15,
        mosaic_half_deg=(0.02, 0.1),
        domain_size_A=(2000.0, 6000.0),
        b_factor=(25.0, 50.0),
        resolution_limit_A=(1.8, 3.5),
        multi_lattice_probability=0.3,  # (paper)
        class_fractions=_fractions("LN83"),
        hit_spots_median=45.0,
        hit_spots_spread=0.8,
        miss_weak_crystal_fraction=0.2,
        sample_miss_fraction=0.15,
        air_scatter=(15.0, 45.0),
        solvent_scatter=(5.0, 20.0),
        water_ring=(8.0, 30.0),
        kapton_probability=0.9,
        kapton_transmission=(0.7, 0.85),
        kapton_angle_deg=90.0,
    ),
    "LO19": _rayonix(
        name="LO19",
        description="cyclophilin A, Rayonix at MFX, GDVN liquid jet (run 20): sparse small-cell lattices",
        energy_keV=9.442,  # (paper)
        unit_cell=(42.0, 52.0, 88.0, 90.0, 90.0, 90.0),  # (paper)
        space_group="P 21 21 21",  # (paper)
        distance_mm=110.0,
        gain=0.19,  # (fv5080)
        mosaic_half_deg=(0.02, 0.08),
        domain_size_A=(2000.0, 8000.0),
        b_factor=(15.0, 35.0),
        resolution_limit_A=(1.5, 3.0),
        multi_lattice_probability=0.2,  # (paper)
        class_fractions=_fractions("LO19"),
        hit_spots_median=30.0,
        hit_spots_spread=0.6,
        miss_weak_crystal_fraction=0.25,
        sample_miss_fraction=0.1,
        air_scatter=(15.0, 45.0),
        solvent_scatter=(5.0, 25.0),
        water_ring=(10.0, 40.0),
        jet_streak_probability=0.2,
        jet_streak_angle_deg=0.0,
    ),
}


def get_preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def preset_fields():
    """Names and types of the overridable knobs (everything but the name)."""
    return {f.name: f.type for f in dataclasses.fields(Preset) if f.name != "name"}


def override(preset, **changes):
    """A copy of ``preset`` with ``changes`` applied; tuples may be given as lists, checked loosely."""
    fields = {f.name: f for f in dataclasses.fields(Preset)}
    clean = {}
    for key, value in changes.items():
        if key not in fields:
            raise PresetError(f"unknown preset parameter {key!r}; known: {', '.join(sorted(fields))}")
        current = getattr(preset, key)
        if isinstance(current, tuple) and value is not None:
            value = tuple(float(v) for v in value)
            if len(value) != len(current):
                raise PresetError(f"{key} needs {len(current)} numbers, got {len(value)}")
        clean[key] = value
    result = dataclasses.replace(preset, **clean)
    check_preset(result)
    return result


def check_preset(preset):
    """Raise PresetError for values no shot can be drawn from."""
    problems = []
    if preset.family not in FAMILIES:
        problems.append(f"family must be one of {FAMILIES}, got {preset.family!r}")
    if not 2.0 <= preset.energy_keV <= 30.0:
        problems.append(f"energy_keV {preset.energy_keV} outside 2-30 keV")
    if preset.distance_mm <= 0:
        problems.append("distance_mm must be positive")
    if preset.gain <= 0:
        problems.append("gain must be positive")
    fractions = preset.class_fractions
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        problems.append("class_fractions needs three non-negative numbers (HIT, MAYBE, MISS)")
    for name in ("miss_weak_crystal_fraction", "blank_fraction", "sample_miss_fraction",
                 "jet_streak_probability", "kapton_probability", "multi_lattice_probability",
                 "ice_ring_probability", "beamstop_probability", "beamstop_arm_probability"):
        value = getattr(preset, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must lie in [0, 1], got {value}")
    for name in ("psf_sigma_px", "mosaic_half_deg", "domain_size_A", "resolution_limit_A",
                 "air_scatter", "solvent_scatter", "water_ring", "b_factor"):
        low, high = getattr(preset, name)
        if low < 0 or high < low:
            problems.append(f"{name} must be a (low, high) range with 0 <= low <= high, got {(low, high)}")
    for name in ("ice_ring_photons", "ice_ring_width", "beamstop_radius_mm", "beamstop_arm_width_mm",
                 "beamstop_transmission"):
        low, high = getattr(preset, name)
        if not 0 < low <= high:
            problems.append(f"{name} must be a (low, high) range with 0 < low <= high, got {(low, high)}")
    if min(preset.resolution_limit_A) < 0.8:
        problems.append("resolution_limit_A below 0.8 A is not supported")
    if problems:
        raise PresetError(f"preset {preset.name}: " + "; ".join(problems))
    return preset
