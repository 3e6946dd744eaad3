"""Hot pixels: found from the run, masked before classification, so that blanks stay misses."""

import numpy as np
import pytest
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_cnn import layouts, presets, simulate
from dials_cnn.classify import classify_units, find_run_hot_pixels, image_units
from dials_cnn.default_model import shipped_model_path
from dials_cnn.hot_pixels import spread_sample
from dials_cnn.model import load_model

N_IMAGES, N_HOT = 12, 8


@pytest.fixture(scope="module")
def run_with_hot_pixels(tmp_path_factory):
    """12 simulated LO19 stills with the same 8 hot pixels in the expert's window of every one, each 3x
    the first still's 99.99th percentile (warm enough to pass for spots; a saturated one would instead
    inflate the global z-score of LCN and dim real spots)."""
    preset = presets.get_preset("LO19")
    frame = simulate.detector_frame(preset.family)
    stills = [simulate.simulate_image(preset, 5, index) for index in range(N_IMAGES)]
    cx, cy = (int(round(v)) for v in stills[0].beam_centre_px)
    rng = np.random.default_rng(3)
    hot = []
    while len(hot) < N_HOT:  # trusted pixels well inside the window, away from the beam stop
        y, x = int(rng.integers(cy - 300, cy - 40)), int(rng.integers(cx - 400, cx + 400))
        if stills[0].mask[y, x]:
            hot.append((y, x))
    level = 3 * int(np.percentile(stills[0].image[stills[0].mask], 99.99))
    path = tmp_path_factory.mktemp("hot") / "hot.h5"
    with layouts.Idh5Writer(path, image_shape=stills[0].image.shape, pixel_size_mm=frame.pixel_size_mm,
                            beam_center_mm=(cx * frame.pixel_size_mm, cy * frame.pixel_size_mm),
                            min_trusted_value=preset.min_trusted_value, saturated_value=preset.saturated_value,
                            chunk_size=4) as writer:
        for still in stills:
            image = still.image.copy()
            for y, x in hot:
                image[y, x] = level
            writer.append(image, still.distance_mm, still.wavelength_A)
    experiments = ExperimentListFactory.from_filenames([str(path)])
    return experiments, hot, [still.truth for still in stills], path


@pytest.fixture(scope="module")
def model():
    return load_model(shipped_model_path())


def test_the_hot_pixels_of_a_run_are_found_and_nothing_else(run_with_hot_pixels, model):
    experiments, hot, _, _ = run_with_hot_pixels
    masks, reports = find_run_hot_pixels(image_units(experiments), model.preprocess)
    assert len(masks) == 1 and len(reports) == 1 and "8 masked" in reports[0]
    (grid,) = masks.values()  # a single flat panel: the flat grid is the panel
    assert sorted(zip(*np.nonzero(grid))) == sorted(hot)


def test_worker_processes_find_the_same_hot_pixels(run_with_hot_pixels, model):
    experiments, _, _, _ = run_with_hot_pixels
    units = image_units(experiments)
    alone, reports_alone = find_run_hot_pixels(units, model.preprocess)
    shared, reports_shared = find_run_hot_pixels(units, model.preprocess, nproc=2)
    assert alone.keys() == shared.keys() and reports_alone == reports_shared
    for key in alone:
        np.testing.assert_array_equal(alone[key], shared[key])


def test_masked_hot_pixels_keep_blanks_misses(run_with_hot_pixels, model):
    experiments, _, truths, _ = run_with_hot_pixels
    units = image_units(experiments)
    blanks = [k for k, truth in enumerate(truths) if truth["n_visible_spots"] == 0]
    assert len(blanks) >= 3
    masks, _ = find_run_hot_pixels(units, model.preprocess)
    plain = classify_units(units, model)
    masked = classify_units(units, model, hot_pixels=masks)
    # each hot pixel counts as a spot for the network: unmasked, 8 of them make every blank a hit
    assert all(plain.records[k].decision == "Hit" for k in blanks)
    assert all(masked.records[k].decision == "Miss" for k in blanks)
    assert all(masked.records[k].decision == "Hit" for k, truth in enumerate(truths) if truth["label"] == "HIT")


def test_too_few_images_mask_nothing(run_with_hot_pixels, model):
    experiments, _, _, _ = run_with_hot_pixels
    masks, reports = find_run_hot_pixels(image_units(experiments)[:5], model.preprocess)
    assert masks == {} and "fewer than 10" in reports[0]


def test_the_sample_spreads_over_the_run():
    assert spread_sample(5, 40) == [0, 1, 2, 3, 4]
    sample = spread_sample(1000, 40)
    assert len(sample) == 40 and sample[0] == 0 and sample[-1] == 999


def test_dials_cnn_classify_masks_them_and_says_so(run_with_hot_pixels, tmp_path, monkeypatch):
    import json

    from dials_cnn.command_line import classify as command

    experiments, _, truths, _ = run_with_hot_pixels
    experiments.as_file(str(tmp_path / "imported.expt"))
    monkeypatch.chdir(tmp_path)
    for find, directory in (("True", "on"), ("False", "off")):
        command.run(["imported.expt", f"hot_pixels.find={find}", f"output.directory={directory}"])
    on = json.loads((tmp_path / "on" / "cnn_classification.json").read_text())
    off = json.loads((tmp_path / "off" / "cnn_classification.json").read_text())
    assert on["hot_pixels"]["masked"] == N_HOT and "8 masked" in on["hot_pixels"]["reports"][0]
    assert "hot_pixels" not in off
    truth_hits = sum(truth["n_visible_spots"] >= 4 for truth in truths)
    assert on["summary"]["hits"] == truth_hits < off["summary"]["hits"] == N_IMAGES


def test_live_mode_finds_them_on_the_first_chunk(run_with_hot_pixels, model, tmp_path):
    import shutil

    from dials_cnn.live import LiveClassifier

    _, hot, truths, path = run_with_hot_pixels
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(path, folder / "hot.h5")
    watcher = LiveClassifier(folder, model, tmp_path / "rows.csv", poll_seconds=0.1, idle_timeout=1.0)
    classification, _ = watcher.run()
    (grid,) = watcher.hot_pixel_search.hot_pixels.values()
    assert sorted(zip(*np.nonzero(grid))) == sorted(hot) and "8 masked" in watcher.hot_pixel_search.reports[0]
    decisions = [record.decision for record in classification.records]
    assert decisions == ["Hit" if truth["n_visible_spots"] >= 4 else "Miss" for truth in truths]


def test_a_run_arriving_one_image_at_a_time_is_searched_once_ten_have_come(run_with_hot_pixels, model):
    """One image per file in live mode, or the stills_process veto (one still per call): the images
    of a detector are kept until there are 10, then searched once; nothing is masked before."""
    from dials_cnn.classify import RunningHotPixelSearch

    experiments, hot, _, _ = run_with_hot_pixels
    search = RunningHotPixelSearch(model.preprocess)
    units = image_units(experiments)
    known = [dict(search.update([unit])) for unit in units]
    assert all(k == {} for k in known[:9])
    (grid,) = known[9].values()
    assert sorted(zip(*np.nonzero(grid))) == sorted(hot)
    assert known[10].keys() == known[9].keys() and len(search.reports) == 1


def test_the_stills_process_veto_masks_them_from_the_tenth_still_on(run_with_hot_pixels, model):
    from dxtbx.model.experiment_list import ExperimentList

    from dials_cnn.prefilter import CNNVeto

    experiments, hot, truths, _ = run_with_hot_pixels
    assert len(experiments) == N_IMAGES
    veto = CNNVeto(shipped_model_path())
    decisions = [veto.classify(ExperimentList([experiment]))[0].decision for experiment in experiments]
    (grid,) = veto.hot_pixels.values()
    assert sorted(zip(*np.nonzero(grid))) == sorted(hot)
    # stills 10-12 are classified with the mask; before it, a blank with 8 hot pixels is kept (a Hit)
    assert decisions[9:] == ["Hit" if truth["n_visible_spots"] >= 4 else "Miss" for truth in truths[9:]]
    assert all(d == "Hit" for d in decisions[:9])
    unmasked = CNNVeto(shipped_model_path(), hot_pixels=False)
    assert all(unmasked.classify(ExperimentList([e]))[0].decision == "Hit" for e in experiments[9:])
