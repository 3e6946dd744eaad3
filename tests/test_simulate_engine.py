"""dials_cnn.simulate: physics against DIALS, labels against the truth, determinism, detector families."""

import csv
import dataclasses

import h5py
import numpy as np
import pytest

from dials.algorithms.spot_prediction import StillsReflectionPredictor
from dials.array_family import flex  # noqa: F401 (registers the reflection_table converter)
from dxtbx.model import Experiment

from dials_cnn import annotations, cspad, presets, simulate


def first_shot(preset, seed, want=lambda shot: True, randomise=False):
    for index in range(200):
        rng = simulate.image_rng(seed, index)
        shot = simulate.sample_shot(preset, rng, randomise=randomise)
        if want(shot):
            return shot, rng
    raise AssertionError("no shot matched")


@pytest.mark.parametrize("preset", ["L498", "LN84", "LO19"])
def test_predicted_positions_agree_with_dials_stills_predictor(preset):
    shot, _ = first_shot(preset, 3, lambda s: bool(s.crystals))
    crystal = shot.crystals[0]
    detector, beam = simulate.detector_and_beam(shot)
    model = crystal.model()
    d_min = 2.5
    predictor = StillsReflectionPredictor(Experiment(detector=detector, beam=beam, crystal=model), dmin=d_min)
    assert type(predictor).__name__ == "NaveStillsReflectionPredictor"
    dials = predictor.for_ub(model.get_A())
    ours = simulate.predict_reflections(shot, crystal, d_min=d_min)
    positions = {tuple(h): (x, y) for h, x, y in zip(ours["hkl"].tolist(), ours["x"], ours["y"])}
    assert len(dials) > 50
    # every reflection DIALS predicts in diffracting condition is drawn, at the same pixel position
    for hkl, (x, y, _) in zip(dials["miller_index"], dials["xyzcal.px"]):
        assert tuple(hkl) in positions, hkl
        assert positions[tuple(hkl)] == pytest.approx((x, y), abs=1e-6)
    # the extra (partial) reflections we draw are exactly those outside the Nave acceptance
    nave = ours["d"] / crystal.domain_size_A + np.radians(crystal.mosaic_half_deg) / 2
    assert np.count_nonzero(np.abs(ours["delpsi"]) < nave) == len(dials)


def test_systematic_absences_follow_the_space_group():
    shot, _ = first_shot("L498", 5, lambda s: bool(s.crystals))  # P 61 2 2: 00l present only for l = 6n
    reflections = simulate.predict_reflections(shot, shot.crystals[0], d_min=1.5)
    hkl = reflections["hkl"]
    axial = hkl[(hkl[:, 0] == 0) & (hkl[:, 1] == 0)]
    assert np.all(axial[:, 2] % 6 == 0)


@pytest.fixture(scope="module")
def lo19_stills():
    return [simulate.simulate_image("LO19", 11, index, vary_beam_centre=True) for index in range(24)]


def test_labels_follow_the_expert_rule_on_the_truth_counts(lo19_stills):
    labels = set()
    for still in lo19_stills:
        truth = still.truth
        spots = still.spots
        counted = int(np.count_nonzero(spots["visible"] & spots["in_window"]))
        assert truth["n_visible_spots"] == counted
        assert truth["n_spots_total"] == int(np.count_nonzero(spots["visible"]))
        assert truth["label"] == simulate.label_for_count(counted)
        labels.add(truth["label"])
        assert truth["n_visible_in_image"] == int(np.count_nonzero(spots["visible_in_image"] & spots["in_window"]))
        if truth["target_visible_spots"] is not None and truth["target_visible_spots"] < 10:
            # brightness is solved so that exactly the drawn number of spots is visible
            assert counted == truth["target_visible_spots"]
        if not truth["crystal_present"]:
            assert counted == 0 and truth["label"] == "MISS"
    assert labels == {"HIT", "MAYBE", "MISS"}
    assert [simulate.label_for_count(n) for n in (0, 3, 4, 9, 10, 500)] == ["MISS", "MISS", "MAYBE", "MAYBE", "HIT", "HIT"]


def test_visibility_in_the_drawn_image_is_measured_too(lo19_stills):
    """Near the criterion the noise decides what the image shows: the realised photons scatter around
    the expected ones without bias, with the criterion's noise (threshold / SNR 5 is one standard
    deviation), and some spots flip either way; far from it nothing changes."""
    z, flips_up, flips_down = [], 0, 0
    for still in lo19_stills:
        spots = still.spots
        photons, shown, threshold = spots["photons"], spots["realised_photons"], spots["visibility_threshold"]
        near = (photons > 0.5 * threshold) & (photons < 2 * threshold) & (shown != photons)
        z.extend((shown[near] - photons[near]) / (threshold[near] / 5))
        flips_up += int(np.count_nonzero(spots["visible_in_image"] & ~spots["visible"]))
        flips_down += int(np.count_nonzero(~spots["visible_in_image"] & spots["visible"]))
        far = photons > 5 * threshold
        assert np.all(spots["visible"][far] == spots["visible_in_image"][far])
        assert np.all(shown[far] == photons[far])
    z = np.asarray(z)
    assert z.size > 100
    assert abs(z.mean()) < 0.15
    assert 0.7 < z.std() < 1.4
    assert flips_up > 0 and flips_down > 0


def test_visibility_counts_the_rounding_to_whole_adu_at_low_gain():
    """At 0.15 ADU per photon the rounding of each pixel to a whole ADU is most of a CSPAD pixel's noise
    (0.29 ADU = 1.9 photons). The criterion counts it: the photons the drawn image shows scatter around
    the expected ones as they do at the preset's 4.55 ADU per photon, without a bias (ignoring the
    rounding gave a standard deviation of 3.1 criterion units and a bias of -1.1)."""
    for adu_per_photon in (4.55, 0.15):
        z = []
        for index in range(40):
            rng = simulate.image_rng(7, index)
            shot = simulate.sample_shot("L498", rng)
            if shot.intended_label == "MISS" or not shot.pulse:
                continue
            shot = dataclasses.replace(shot, adu_per_photon=adu_per_photon, gain=adu_per_photon,
                                       read_noise_adu=0.05, common_mode_sigma_adu=0.0)
            spots = simulate.simulate_still(shot, rng).spots
            photons, shown, threshold = spots["photons"], spots["realised_photons"], spots["visibility_threshold"]
            near = (photons > 0.5 * threshold) & (photons < 2 * threshold) & (shown != photons)
            z.extend((shown[near] - photons[near]) / (threshold[near] / 5))
        z = np.asarray(z)
        assert z.size > 300
        assert abs(z.mean()) < 0.4, adu_per_photon
        assert z.std() < 2.3, adu_per_photon


def test_visible_spots_stand_out_from_the_background(lo19_stills):
    still = next(s for s in lo19_stills if s.truth["n_visible_spots"] >= 10)
    spots = still.spots
    image = still.image.astype(float)
    contrasts = []
    for x, y in zip(spots["x"][spots["visible"]], spots["y"][spots["visible"]]):
        ix, iy = int(x), int(y)
        peak = image[iy - 1 : iy + 2, ix - 1 : ix + 2].mean()
        ring = np.concatenate([image[iy - 12 : iy + 13, ix - 12].ravel(), image[iy - 12 : iy + 13, ix + 12].ravel()])
        contrasts.append((peak - np.median(ring)) / (ring.std() + 1e-9))
    assert np.median(contrasts) > 2.0


def test_same_seed_gives_identical_images_and_truth():
    a = simulate.simulate_image("L498", 4, 2)
    b = simulate.simulate_image("L498", 4, 2)
    c = simulate.simulate_image("L498", 5, 2)
    assert a.image.dtype == np.int32
    assert np.array_equal(a.image, b.image) and a.truth == b.truth
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("family", ["cspad", "rayonix", "pilatus", "eiger"])
def test_detector_families_write_their_frames(family):
    preset = dataclasses.replace(presets.get_preset("L498" if family == "cspad" else "LO19"), family=family)
    shot, rng = first_shot(preset, 8, lambda s: bool(s.crystals))
    still = simulate.simulate_still(shot, rng)
    frame = simulate.detector_frame(family)
    image = still.image
    assert image.shape == frame.shape and image.dtype == np.int32
    assert still.mask.shape == frame.shape and still.mask.dtype == bool
    assert np.all(image[~frame.active] == frame.gap_value)
    assert image.max() <= shot.saturated_value
    assert not np.any(still.mask & ~frame.active)
    if family == "cspad":
        assert frame.gap_value == 0 and image.shape == cspad.ASSEMBLED_SHAPE
        assert np.any(image[frame.active] < 0)  # dark subtraction leaves negatives
    if family == "rayonix":
        assert frame.hole_radius_px > 0 and image.min() >= 0
    if family in ("pilatus", "eiger"):
        assert frame.gap_value == -1 and image[frame.active].min() >= 0
    detector, beam = simulate.detector_and_beam(shot)
    assert detector[0].get_image_size() == (frame.shape[1], frame.shape[0])
    assert detector[0].get_beam_centre_px(beam.get_s0()) == pytest.approx(shot.beam_centre_px)


def test_bright_spots_saturate_at_the_trusted_maximum():
    shot, rng = first_shot("LN83", 2, lambda s: bool(s.crystals))
    shot.brightness = 1.0e7  # far beyond a real crystal: the brightest pixels peg
    still = simulate.simulate_still(shot, rng)
    assert still.image.max() == shot.saturated_value


def test_blank_shot_is_dark_noise_only():
    shot, rng = first_shot("LG36", 1, lambda s: s.crystals == [])
    shot = dataclasses.replace(shot, pulse=False)
    still = simulate.simulate_still(shot, rng)
    frame = simulate.detector_frame("cspad")
    values = still.image[frame.active].astype(float)
    assert still.truth["blank"] and still.truth["label"] == "MISS" and not still.truth["crystal_present"]
    assert abs(values.mean()) < 3 and values.std() < 200
    assert "no_pulse" in still.truth["artefacts"]


def test_artefacts_leave_their_marks():
    shot, rng = first_shot("LN84", 4, lambda s: s.kapton is not None and not s.crystals)
    shot = dataclasses.replace(shot, kapton=(90.0, 0.0, 0.5), jet_streak=(0.0, 200.0, 300.0, 1.0))
    still = simulate.simulate_still(shot, rng)
    image = still.image.astype(float)
    cx, cy = (int(v) for v in shot.beam_centre_px)
    # Kapton belt: the half-plane on one side of the vertical edge through the beam is dimmed
    left, right = image[cy - 300 : cy + 300, cx - 300 : cx - 100], image[cy - 300 : cy + 300, cx + 100 : cx + 300]
    assert min(left.mean(), right.mean()) < 0.8 * max(left.mean(), right.mean())
    # jet streak: a bright horizontal line through the beam
    assert image[cy, cx + 35 : cx + 60].mean() > 1.3 * image[cy + 8, cx + 35 : cx + 60].mean()
    assert {"kapton_shadow", "jet_streak"} <= set(still.truth["artefacts"])


def test_lg36_low_gain_zone_and_shadowed_asics():
    shot, rng = first_shot("LG36", 6, lambda s: s.sample_in_beam and s.pulse)
    still = simulate.simulate_still(shot, rng)
    frame = simulate.detector_frame("cspad")
    cx, cy = shot.beam_centre_px
    zone = frame.active.copy()
    rows, cols = np.nonzero(zone)
    near = np.hypot(cols + 0.5 - cx, rows + 0.5 - cy) < 0.5 * simulate._low_gain_radius_px(shot)
    assert np.all(still.image[rows[near], cols[near]] % 7 == 0)  # low-gain pixels, multiplied by 7
    shadow_row = simulate._shadowed_rows(shot)
    assert still.image[shadow_row:][frame.active[shadow_row:]].std() < 50  # dark noise only


def test_randomise_spans_families_classes_and_cells():
    families, labels, cells = set(), set(), []
    for index in range(30):
        still = simulate.simulate_image("LO19", 21, index, randomise=True, vary_beam_centre=True)
        families.add(still.family)
        labels.add(still.truth["label"])
        if still.shot.crystals:
            cells.append(max(still.shot.crystals[0].unit_cell[:3]))
    assert len(families) >= 3
    assert labels == {"HIT", "MAYBE", "MISS"}
    assert min(cells) < 120 and max(cells) > 150


def test_randomise_draws_nanocrystals_whose_spots_are_broad():
    shots = [simulate.sample_shot("LN84", simulate.image_rng(31, i), randomise=True) for i in range(80)]
    sizes = np.array([c.domain_size_A for shot in shots for c in shot.crystals])
    # other simulators draw crystals of a few dozen cells; the sharp-spot majority stays
    assert 0.1 < np.mean(sizes < 500) < 0.5 and sizes.max() > 5000
    shot = next(s for s in shots if s.crystals and s.crystals[0].domain_size_A < 500)
    large = dataclasses.replace(shot, crystals=[dataclasses.replace(c, domain_size_A=20000.0) for c in shot.crystals])
    widths = []
    for each in (shot, large):
        geometry = simulate._Geometry(each)
        spots = simulate.predict_reflections(each, each.crystals[0], geometry)
        radial, tangential = simulate._spot_sigmas(each, [each.crystals[0]] * spots["x"].size, spots, geometry)
        widths.append((np.median(radial), np.median(tangential), spots["x"].size))
    (radial_nano, tangential_nano, n_nano), (radial_large, tangential_large, n_large) = widths
    assert tangential_nano > 1.5 * tangential_large and radial_nano > radial_large
    assert n_nano > n_large  # small domains also widen the acceptance: more partial reflections


def test_ice_rings_lie_at_the_ice_spacings_dxtbx_computes_and_only_randomised_shots_have_them():
    randomised = [simulate.sample_shot("LO19", simulate.image_rng(41, i), randomise=True) for i in range(100)]
    assert 10 <= sum(bool(s.ice_rings) for s in randomised) <= 50
    assert not any(simulate.sample_shot(name, simulate.image_rng(41, i)).ice_rings
                   for name in presets.PRESETS for i in range(20))
    shot, rng = first_shot("LO19", 41, lambda s: s.family == "rayonix" and s.pulse and s.sample_in_beam and not s.kapton,
                           randomise=True)
    shot = dataclasses.replace(shot, ice_rings=(50.0, 0.002, 0.0), jet_streak=None)
    assert "ice_rings" in shot.artefacts
    still = simulate.simulate_still(shot, rng)
    detector, beam = simulate.detector_and_beam(shot)
    panel, s0 = detector[0], beam.get_s0()
    pixels = np.random.default_rng(0).integers(0, shot.image_shape, size=(40000, 2))
    inverse_d = np.array([1 / panel.get_resolution_at_pixel(s0, (float(x) + 0.5, float(y) + 0.5)) for y, x in pixels])
    values = still.image[pixels[:, 0], pixels[:, 1]].astype(float)
    good = still.mask[pixels[:, 0], pixels[:, 1]]
    on_ring = good & (np.abs(inverse_d - 1 / 3.897) < 0.001)
    between = good & (np.abs(inverse_d - (1 / 3.897 + 1 / 3.669) / 2) < 0.001)  # 4 sigma from either ring
    assert on_ring.sum() > 20 and between.sum() > 20
    photons = (values - shot.pedestal_adu) / shot.adu_per_photon
    assert np.median(photons[on_ring]) - np.median(photons[between]) > 10


def test_a_beam_stop_shadows_the_disc_round_the_beam_its_arm_and_the_spots_behind_them():
    assert not any(simulate.sample_shot(name, simulate.image_rng(43, i)).beamstop
                   for name in presets.PRESETS for i in range(20))
    randomised = [simulate.sample_shot("LO19", simulate.image_rng(43, i), randomise=True) for i in range(200)]
    counters = [s for s in randomised if s.family in ("pilatus", "eiger") and s.pulse]
    assert len(counters) > 40 and 0.3 < np.mean([bool(s.beamstop) for s in counters]) < 0.7
    forced = presets.override(presets.get_preset("LO19"), beamstop_probability=1.0, beamstop_arm_probability=1.0)
    drawn = [simulate.sample_shot(forced, simulate.image_rng(43, i)) for i in range(20)]
    assert all(s.beamstop is not None and s.beamstop[2] > 0 for s in drawn if s.pulse)  # a stop with an arm
    assert sum(s.pulse for s in drawn) >= 15
    shot, rng = first_shot("LO19", 43, lambda s: s.pulse and s.sample_in_beam and s.crystals and not s.kapton
                           and s.target_visible_spots >= 30)
    # a Pilatus-like frame (no hole round the beam), the stop and its arm (pointing to +x) drawn by hand
    frame = simulate.detector_frame("pilatus")
    shot = dataclasses.replace(shot, family="pilatus", image_shape=frame.shape, pixel_size_mm=frame.pixel_size_mm,
                               beam_centre_px=(736.0, 740.0), jet_streak=None, adu_per_photon=1.0,
                               read_noise_adu=0.0, pedestal_adu=0.0, solvent_scatter=20.0, water_ring=0.0)
    plain = simulate.simulate_still(shot, simulate.image_rng(5, 0))
    stopped_shot = dataclasses.replace(shot, beamstop=(40.0, 0.0, 12.0, 0.01, 1.0),
                                       brightness=plain.truth["brightness"])
    assert "beamstop" in stopped_shot.artefacts
    stopped = simulate.simulate_still(stopped_shot, simulate.image_rng(5, 0))
    cx, cy = shot.beam_centre_px
    disc = stopped.image[int(cy) - 20:int(cy) + 20, int(cx) - 20:int(cx) + 20]
    arm = stopped.image[int(cy) - 3:int(cy) + 3, int(cx) + 100:int(cx) + 180]  # along +x, off module gaps
    beside = stopped.image[int(cy) + 30:int(cy) + 36, int(cx) + 100:int(cx) + 180]
    assert plain.image[int(cy) - 20:int(cy) + 20, int(cx) - 20:int(cx) + 20].mean() > 10
    assert disc.mean() < 1.0 and arm.mean() < 0.05 * beside.mean()
    # spots behind the stop are not visible; the others are as they were
    behind = simulate._beamstop_transmission(stopped_shot, plain.spots["x"], plain.spots["y"]) < 0.05
    assert np.any(plain.spots["visible"] & behind) and not np.any(stopped.spots["visible"] & behind)
    far = ~behind & (np.hypot(plain.spots["x"] - cx, plain.spots["y"] - cy) > 60)
    assert np.array_equal(stopped.spots["visible"][far], plain.spots["visible"][far])


def test_preset_errors_name_the_problem():
    with pytest.raises(presets.PresetError, match="unknown preset 'L999'"):
        presets.get_preset("L999")
    with pytest.raises(presets.PresetError, match="gain must be positive"):
        presets.override(presets.get_preset("LO19"), gain=-1.0)
    with pytest.raises(presets.PresetError, match="unknown preset parameter 'gian'"):
        presets.override(presets.get_preset("LO19"), gian=1.0)
    with pytest.raises(presets.PresetError, match="ice_ring_width must be a"):
        presets.override(presets.get_preset("LO19"), ice_ring_width=(0.0, 0.01))
    with pytest.raises(presets.PresetError, match="water_ring needs 2 numbers"):
        presets.override(presets.get_preset("LO19"), water_ring=(1.0,))


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def l498_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("l498")
    summary = simulate.simulate_run("L498", 6, 9, directory, layout="raw_cspad", chunk_size=4)
    return directory, summary


def test_run_writes_images_annotation_and_truth(l498_run):
    directory, summary = l498_run
    assert summary["files"] == ["L498_seed9.h5"]
    records = annotations.read_annotations(summary["annotation"])
    with open(summary["truth"]) as handle:
        truth = list(csv.DictReader(handle))
    assert [(r.path, r.index, r.label) for r in records] == [(t["file"], int(t["index"]) - 1, t["label"]) for t in truth]
    for row in truth:
        assert row["label"] == simulate.label_for_count(int(row["n_visible_spots"]))
    # the raw layout holds the ASICs of exactly the images simulate_image draws (any subset)
    with h5py.File(directory / "L498_seed9.h5", "r") as h5:
        asics = h5["data/000001/asics"][1]  # image 5: second image of the second chunk of 4
    assert np.array_equal(cspad.assemble(asics), simulate.simulate_image("L498", 9, 5).image)


def test_run_is_identical_with_several_processes(tmp_path, l498_run):
    directory, summary = l498_run
    again = simulate.simulate_run("L498", 6, 9, tmp_path, layout="raw_cspad", chunk_size=4, nproc=2)
    with h5py.File(directory / "L498_seed9.h5", "r") as a, h5py.File(tmp_path / "L498_seed9.h5", "r") as b:
        for chunk in ("000000", "000001"):
            assert np.array_equal(a[f"data/{chunk}/asics"][()], b[f"data/{chunk}/asics"][()])
            assert np.array_equal(a[f"data/{chunk}/distance"][()], b[f"data/{chunk}/distance"][()])
    assert open(directory / "truth.csv").read() == open(tmp_path / "truth.csv").read()
    assert again["counts"] == summary["counts"]


def test_randomised_run_writes_one_file_per_family(tmp_path):
    summary = simulate.simulate_run("LO19", 5, 3, tmp_path, randomise=True)
    families = {name.rsplit("_", 1)[1][:-3] for name in summary["files"]}
    assert families <= set(presets.FAMILIES) and len(summary["files"]) == len(families)
    records = annotations.read_annotations(summary["annotation"])
    assert len(records) == 5 and {r.path for r in records} == set(summary["files"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_images=0), "n_images must be a positive integer"),
        (dict(n_images=-5), "n_images must be a positive integer"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(nproc=0), "nproc must be at least 1"),
        (dict(layout="rayonix_binned"), "layout rayonix_binned holds rayonix images but preset L498 is a cspad"),
        (dict(layout="raw_cspad", randomise=True), "randomise=True draws every detector family"),
        (dict(layout="cbf"), "unknown layout 'cbf'"),
        (dict(directory="/etc/passwd/run"), "cannot write to output directory /etc/passwd/run"),
    ],
)
def test_bad_run_parameters_raise_one_clear_error(tmp_path, kwargs, message):
    arguments = dict(preset="L498", n_images=2, seed=0, directory=tmp_path / "out")
    arguments.update(kwargs)
    with pytest.raises(simulate.SimulationError, match=message):
        simulate.simulate_run(**arguments)
    assert not (tmp_path / "out").exists()
