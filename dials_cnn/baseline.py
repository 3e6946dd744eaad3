"""The spotfinder baseline: ``dials.find_spots`` per image, then Hit if the spot count >= a threshold.

This is what beamlines use today and what the paper compares the CNN with (Table 2, Fig. 7). The spot
finding runs in-process through the same code path as ``dials.find_spots``
(``flex.reflection_table.from_observations`` with a phil built from ``dials.command_line.find_spots``),
so the counts are those ``dials.find_spots`` would report. Each distinct image is counted once, keyed
like the CNN's records by (file, 0-based index in file).

The per-run presets are the paper's tuned parameters (REFERENCE §4, fv5080 annotation notes). Their
"mask" column was a beamstop / shadow mask file; here the readers' static masks (ASIC gaps, the
Rayonix hole) play that role, and a user mask can still be given as ``spotfinder.lookup.mask``.
"""

import dataclasses
import math
import time

import numpy as np
from libtbx.phil import parse

from dials_cnn.evaluation import DECISIONS


class BaselineError(ValueError):
    """Bad baseline settings (unknown preset, unusable spotfinder parameter)."""


@dataclasses.dataclass(frozen=True)
class BaselinePreset:
    """Spotfinder parameters and spot-count threshold tuned for one LCLS run (paper Table 2)."""

    name: str
    gain: float
    global_threshold: float
    threshold: int  # Hit if spot count >= threshold
    sigma_strong: float = None
    min_spot_size: int = None

    def phil(self):
        lines = [
            f"spotfinder.threshold.dispersion.gain = {self.gain}",
            f"spotfinder.threshold.dispersion.global_threshold = {self.global_threshold}",
        ]
        if self.sigma_strong is not None:
            lines.append(f"spotfinder.threshold.dispersion.sigma_strong = {self.sigma_strong}")
        if self.min_spot_size is not None:
            lines.append(f"spotfinder.filter.min_spot_size = {self.min_spot_size}")
        return "\n".join(lines)


#: REFERENCE §4 / paper Table 2.
PRESETS = {
    "L498": BaselinePreset("L498", gain=4.55, global_threshold=100, threshold=30, sigma_strong=6),
    "LG36": BaselinePreset("LG36", gain=15.64, global_threshold=100, threshold=20, min_spot_size=2),
    "LN84": BaselinePreset("LN84", gain=0.31, global_threshold=200, threshold=30),
    "LN83": BaselinePreset("LN83", gain=0.27, global_threshold=200, threshold=15),
    "LO19": BaselinePreset("LO19", gain=0.19, global_threshold=200, threshold=50),
}

#: Threshold used without a preset: the DIALS stills_process hit finder's default.
DEFAULT_THRESHOLD = 16


def get_preset(name):
    try:
        return PRESETS[name]
    except KeyError:
        raise BaselineError(f"unknown baseline preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def spotfinder_phil(preset=None, overrides=()):
    """The working ``dials.find_spots`` phil: DIALS defaults, then the preset, then ``overrides``.

    ``overrides``: phil scopes or strings (e.g. a user's ``spotfinder.*`` arguments); they win over
    the preset. ``spotfinder.mp.nproc`` defaults to 1 here (``dials.find_spots`` uses Auto) so that
    timings compare like with like; override it to use more cores.
    """
    from dials.command_line.find_spots import phil_scope

    sources = [parse("spotfinder.mp.nproc = 1")]
    if preset is not None:
        if isinstance(preset, str):
            preset = get_preset(preset)
        sources.append(parse(preset.phil()))
    for override in overrides:
        sources.append(parse(override) if isinstance(override, str) else override)
    try:
        working, unused = phil_scope.fetch(sources=sources, track_unused_definitions=True)
        working.extract()  # values are only checked on extraction
    except Exception as error:  # a wrongly typed value: libtbx raises Sorry / RuntimeError
        raise BaselineError(f"bad spotfinder parameter: {str(error).splitlines()[0]}") from None
    spotfinder_unused = [u for u in unused if str(u.path).startswith("spotfinder")]
    if spotfinder_unused:
        raise BaselineError(
            "unknown spotfinder parameter(s): " + ", ".join(str(u.path) for u in spotfinder_unused)
            + " (see dials.find_spots -c for the list)"
        )
    return working


def spotfinder_params(preset=None, overrides=()):
    return spotfinder_phil(preset, overrides).extract()


def spotfinder_diff(preset=None, overrides=()):
    """The parameters that differ from ``dials.find_spots``' defaults, as phil text (for reports)."""
    from dials.command_line.find_spots import phil_scope

    return phil_scope.fetch_diff(source=spotfinder_phil(preset, overrides)).as_str()


@dataclasses.dataclass
class SpotCounts:
    keys: list  # (path, 0-based index in file) per image, in input order
    counts: np.ndarray  # strong spots per image (0 where spot finding failed)
    seconds: float  # wall time of spot finding
    failed: dict = dataclasses.field(default_factory=dict)  # position in the input -> why spot finding failed

    @property
    def images_per_second(self):
        return len(self.counts) / self.seconds if self.seconds > 0 else math.nan

    def decisions(self, threshold):
        return hit_decisions(self.counts, threshold)


def hit_decisions(counts, threshold):
    """"Hit" where the spot count >= ``threshold``, else "Miss"."""
    return np.where(np.asarray(counts) >= threshold, DECISIONS[0], DECISIONS[1])


def _first_sentence(error):
    """DIALS' message without its 'please report this' preamble, on one line."""
    text = " ".join(str(error).replace("Please report this error to dials-support@lists.sourceforge.net:", "").split())
    return text.split(". ")[0]


#: spot finding failing on more than this share of the images means its parameters do not fit the
#: detector (one clear error); on fewer, those images count as no spots and are listed
MAX_FAILED_FRACTION = 0.5


def count_spots(units, params, max_failed_fraction=MAX_FAILED_FRACTION):
    """Strong spots on each image of ``units`` (from :func:`dials_cnn.classify.image_units`).

    Spot finding runs once per imageset, as ``dials.find_spots`` does; a spot belongs to the image
    its centroid z falls on (for stills every image is its own frame). Where it fails (DIALS refuses
    an image with more strong pixels than it allows: an ice ring, a detector glitch) the images count
    as no spots, as a spot-count veto would drop them, and :attr:`SpotCounts.failed` says why; on
    more than ``max_failed_fraction`` of them (1: never), :class:`BaselineError`.
    """
    from dials.array_family import flex
    from dxtbx.imageset import ImageSequence
    from dxtbx.model import Experiment
    from dxtbx.model.experiment_list import ExperimentList

    by_imageset = {}
    for k, unit in enumerate(units):
        by_imageset.setdefault(id(unit.imageset), (unit.imageset, []))[1].append(k)
    counts = np.zeros(len(units), dtype=np.int64)
    failed = {}
    started = time.time()
    for imageset, members in by_imageset.values():
        experiments = ExperimentList(
            [Experiment(imageset=imageset, beam=imageset.get_beam(0), detector=imageset.get_detector(0))]
        )
        try:
            reflections = flex.reflection_table.from_observations(experiments, params, is_stills=True)
        except RuntimeError as error:  # e.g. more strong pixels than max_strong_pixel_fraction allows
            failed.update((k, f"{imageset.get_path(0)}: dials.find_spots failed ({_first_sentence(error)})")
                          for k in members)
            continue
        # z of a still is its index in the file (a slice of a multi-image file keeps it); z of a
        # sequence is in the scan's array range
        if isinstance(imageset, ImageSequence):
            first = imageset.get_array_range()[0]
            position_of_frame = {first + p: p for p in range(len(imageset))}
        else:
            position_of_frame = {int(frame): p for p, frame in enumerate(imageset.indices())}
        per_position = np.zeros(len(imageset), dtype=np.int64)
        if len(reflections):
            frames = np.floor(reflections["xyzobs.px.value"].parts()[2].as_numpy_array()).astype(np.int64)
            for frame, n in zip(*np.unique(frames, return_counts=True)):
                per_position[position_of_frame[int(frame)]] += n
        for k in members:
            counts[k] = per_position[units[k].position]
    seconds = time.time() - started
    if len(failed) > max_failed_fraction * len(units):
        more = f", and on {len(failed) - 1} more of {len(units)} images" if len(failed) > 1 else ""
        raise BaselineError(
            f"{next(iter(failed.values()))}{more}. Its parameters do not fit this detector: pass "
            f"baseline.preset=<one of {', '.join(sorted(PRESETS))}> or set "
            "spotfinder.threshold.dispersion.gain=<ADU per photon>")
    return SpotCounts([(u.path, u.file_index) for u in units], counts, seconds, failed)
