"""The spotfinder baseline counts what /usr/bin/dials.find_spots finds, image by image; presets and overrides.

The small runs and tiny models come from tests/simulated_runs.py.
"""

import collections
import subprocess

import numpy as np
import pytest
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

from dials_cnn import baseline
from dials_cnn.classify import image_units

from simulated_runs import SPOTFINDER, write_small_run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("baseline")
    return write_small_run(directory, n_images=8, seed=1)


def test_counts_equal_those_of_dials_find_spots(small_run, tmp_path):
    h5, _, _ = small_run
    preset = baseline.get_preset("LO19")
    phil = tmp_path / "spotfinder.phil"
    phil.write_text(preset.phil() + "\n" + "\n".join(SPOTFINDER) + "\n")
    subprocess.run(["/usr/bin/dials.import", str(h5), "output.experiments=imported.expt"], cwd=tmp_path, check=True,
                   capture_output=True)
    subprocess.run(["/usr/bin/dials.find_spots", "imported.expt", str(phil), "output.reflections=strong.refl"],
                   cwd=tmp_path, check=True, capture_output=True)
    imported = ExperimentList.from_file(str(tmp_path / "imported.expt"))
    assert len(imported) == 8  # stills: one experiment per image
    strong = flex.reflection_table.from_file(str(tmp_path / "strong.refl"))
    per_experiment = collections.Counter(strong["id"])
    expected = [per_experiment.get(i, 0) for i in range(len(imported))]
    assert sum(expected) > 0 and expected.count(0) < len(expected)

    params = baseline.spotfinder_params("LO19", SPOTFINDER)
    units = image_units(imported)
    counted = baseline.count_spots(units, params)
    assert counted.counts.tolist() == expected
    assert counted.keys == [(str(h5), i) for i in range(8)]
    assert counted.seconds > 0

    # the same file read directly (not through dials.import) gives the same counts
    direct = baseline.count_spots(image_units(ExperimentListFactory.from_filenames([str(h5)])), params)
    assert direct.counts.tolist() == expected

    threshold = sorted(expected)[len(expected) // 2]
    decisions = counted.decisions(threshold)
    assert decisions.tolist() == ["Hit" if n >= threshold else "Miss" for n in expected]


def test_counts_of_image_sequences(tmp_path):
    """Single-image CBF files that dials.import makes into sequences: spots are placed by scan frame."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, DetectorFactory
    from scitbx.array_family import flex as scitbx_flex

    rng = np.random.default_rng(0)
    detector = DetectorFactory.simple("PAD", 100.0, (4.4, 4.4), "+x", "-y", (0.172, 0.172), (64, 64), (-1, 60000))
    paths = []
    for number, spots in enumerate([[], [(10, 12), (40, 50)], [(20, 30), (33, 8), (50, 50)]], start=1):
        image = rng.poisson(10, (64, 64)).astype(np.int32)
        for row, col in spots:
            image[row - 1 : row + 2, col - 1 : col + 2] += 500
        paths.append(str(tmp_path / ("shot_%04d.cbf" % number)))
        FormatCBFMini.as_file(detector, BeamFactory.simple(1.0), None, None, scitbx_flex.int(image), paths[-1])
    subprocess.run(["/usr/bin/dials.import", *paths, "output.experiments=imported.expt"], cwd=tmp_path, check=True,
                   capture_output=True)
    subprocess.run(["/usr/bin/dials.find_spots", "imported.expt"], cwd=tmp_path, check=True, capture_output=True)
    imported = ExperimentList.from_file(str(tmp_path / "imported.expt"))
    assert type(imported[0].imageset).__name__ == "ImageSequence"
    per_experiment = collections.Counter(flex.reflection_table.from_file(str(tmp_path / "strong.refl"))["id"])
    expected = [per_experiment.get(i, 0) for i in range(len(imported))]
    assert expected == [0, 2, 3]
    assert baseline.count_spots(image_units(imported), baseline.spotfinder_params()).counts.tolist() == expected


def test_presets_are_the_papers_and_user_values_win():
    params = baseline.spotfinder_params("L498")
    dispersion = params.spotfinder.threshold.dispersion
    assert (dispersion.gain, dispersion.global_threshold, dispersion.sigma_strong) == (4.55, 100, 6)
    assert baseline.spotfinder_params("LG36").spotfinder.filter.min_spot_size == 2
    assert {name: p.threshold for name, p in baseline.PRESETS.items()} == {
        "L498": 30, "LG36": 20, "LN84": 30, "LN83": 15, "LO19": 50}
    overridden = baseline.spotfinder_params(
        "LN83", ["spotfinder.threshold.dispersion.gain=1.5", "spotfinder.filter.min_spot_size=4"])
    assert overridden.spotfinder.threshold.dispersion.gain == 1.5
    assert overridden.spotfinder.threshold.dispersion.global_threshold == 200
    assert overridden.spotfinder.filter.min_spot_size == 4
    assert overridden.spotfinder.mp.nproc == 1
    diff = baseline.spotfinder_diff("LN83", ["spotfinder.threshold.dispersion.gain=1.5"])
    assert "gain = 1.5" in diff and "global_threshold = 200" in diff
    no_preset = baseline.spotfinder_params()
    assert no_preset.spotfinder.threshold.dispersion.gain is None


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("X99", [], "unknown baseline preset 'X99'"),
        (None, ["spotfinder.threshold.dispersion.no_such_thing=1"], "unknown spotfinder parameter"),
        (None, ["spotfinder.threshold.dispersion.gain=many"], "bad spotfinder parameter"),
    ],
)
def test_bad_settings_give_one_clear_error(preset, overrides, message):
    with pytest.raises(baseline.BaselineError, match=message):
        baseline.spotfinder_params(preset, overrides)


def test_hit_if_count_reaches_threshold():
    assert baseline.hit_decisions(np.array([0, 29, 30, 31]), 30).tolist() == ["Miss", "Miss", "Hit", "Hit"]


def test_a_spot_finder_that_does_not_fit_the_detector_is_one_clear_error(small_run):
    """dials.find_spots refuses an image with more strong pixels than it allows (DIALS' default gain on
    a CSPAD does this); the baseline names the file and what to set instead of a traceback."""
    h5, _, _ = small_run
    params = baseline.spotfinder_params("LO19", SPOTFINDER + ["spotfinder.filter.max_strong_pixel_fraction=1e-6"])
    units = image_units(ExperimentListFactory.from_filenames([str(h5)]))
    with pytest.raises(baseline.BaselineError, match="dials.find_spots failed") as raised:
        baseline.count_spots(units, params)
    message = str(raised.value)
    assert str(h5) in message and "baseline.preset=" in message and "dials-support" not in message
    assert "\n" not in message


def test_an_image_spot_finding_refuses_counts_as_no_spots_and_is_listed(tmp_path):
    """One image with more strong pixels than DIALS allows (an ice ring, a glitch) must not end the
    comparison: it counts as no spots, and the baseline says which and why; the others are counted."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model import BeamFactory, DetectorFactory

    rng = np.random.default_rng(4)
    detector = DetectorFactory.simple("PAD", 100.0, (17.2, 17.2), "+x", "-y", (0.172, 0.172), (200, 200), (-1, 1e6))
    paths = []
    for k in range(3):
        data = rng.poisson(1.0, (200, 200)).astype(np.int32)
        if k == 1:
            data = rng.integers(0, 60000, (200, 200)).astype(np.int32)  # every pixel "strong"
        else:
            for y, x in rng.integers(20, 180, (12, 2)):
                data[y - 1 : y + 2, x - 1 : x + 2] += 200  # bright 3x3 spots
        paths.append(str(tmp_path / f"still_{k + 1:04d}.cbf"))
        FormatCBFMini.as_file(detector, BeamFactory.simple(1.0), None, None, flex.int(data), paths[-1])
    experiments = ExperimentList()
    for path in paths:  # one still per file, as dials.import makes them
        experiments.extend(ExperimentListFactory.from_filenames([path]))
    units = image_units(experiments)
    counted = baseline.count_spots(units, baseline.spotfinder_params())
    assert list(counted.failed) == [1] and paths[1] in counted.failed[1]
    assert "greater than the maximum allowed" in counted.failed[1]
    assert counted.counts[1] == 0 and counted.counts[0] >= 10 and counted.counts[2] >= 10
    # the same spot finder on most images refused: its parameters do not fit, one clear error
    with pytest.raises(baseline.BaselineError, match=r"and on 1 more of 3 images\. Its parameters do not fit"):
        baseline.count_spots([units[1], units[1], units[0]], baseline.spotfinder_params())
