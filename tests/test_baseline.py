"""The spotfinder baseline counts what /usr/bin/dials.find_spots finds, image by image; presets and overrides.

``write_small_run`` and ``tiny_model`` are also used by the report and pre-filter tests.
"""

import collections
import subprocess

import numpy as np
import pytest
import torch
from dials.array_family import flex
from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

from dials_cnn import baseline, layouts, presets, simulate
from dials_cnn.annotations import write_annotations
from dials_cnn.classify import image_units
from dials_cnn.model import build_network, save_model
from dials_cnn.preprocess import PreprocessParams

SIDE = 256  # simulated stills cut to SIDE x SIDE around the beam: small files, fast spot finding
TINY_PREPROCESS = PreprocessParams(pipeline="native", crop=64, bin=2)
# LO19's preset with the global threshold back at DIALS' default, so the cut images have some spots
SPOTFINDER = ["spotfinder.threshold.dispersion.global_threshold=0"]


def write_small_run(directory, preset_name="LO19", n_images=10, seed=1, name="run.h5"):
    """Simulated stills of a preset, cut around the beam, in one idh5 file with expert_annotation.txt.

    Returns (path of the h5 file, path of the annotation file, expert labels)."""
    preset = presets.get_preset(preset_name)
    pixel_mm = simulate.detector_frame(preset.family).pixel_size_mm
    labels = []
    path = directory / name
    with layouts.Idh5Writer(
        path, image_shape=(SIDE, SIDE), pixel_size_mm=pixel_mm, beam_center_mm=(SIDE / 2 * pixel_mm,) * 2,
        min_trusted_value=preset.min_trusted_value, saturated_value=preset.saturated_value, chunk_size=4,
    ) as writer:
        for index in range(n_images):
            still = simulate.simulate_image(preset, seed, index)
            cx, cy = (int(round(v)) for v in still.beam_centre_px)
            cut = still.image[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2]
            writer.append(cut, still.distance_mm, still.wavelength_A)
            labels.append(still.truth["label"])
    annotation = directory / "expert_annotation.txt"
    write_annotations(annotation, [(name, index, label) for index, label in enumerate(labels)])
    return path, annotation, labels


def tiny_model(path, seed=0):
    """An untrained small network (what is tested is bookkeeping, not accuracy). Its final layer is
    drawn at random (spotnet starts from zeros, i.e. the same probabilities for every image)."""
    torch.manual_seed(seed)
    network = build_network("spotnet", widths=(4, 8, 8, 8))
    torch.nn.init.normal_(network.classifier.weight, std=1.0)
    save_model(path, network, "spotnet", TINY_PREPROCESS, architecture_kwargs={"widths": [4, 8, 8, 8]})
    return path


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
