"""dials.cnn_classify on real dxtbx files: every image accounted for, outputs, error paths."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from dials.util import Sorry
from dxtbx.format.FormatCBFMini import FormatCBFMini
from dxtbx.model import BeamFactory, DetectorFactory
from dxtbx.model.experiment_list import ExperimentListFactory
from scitbx.array_family import flex

from dials_cnn import presets, simulate
from dials_cnn.command_line import classify as classify_command
from dials_cnn.default_model import shipped_model_path
from dials_cnn.model import MODEL_FORMAT_VERSION, build_network, save_model
from dials_cnn.preprocess import PreprocessParams

SIDE = 320  # simulated stills cut to SIDE x SIDE around the beam keep the files and the test small
PARAMS = PreprocessParams(pipeline="native", crop=64, bin=2)


def write_simulated_cbfs(directory, preset_name, count, seed):
    """``count`` simulated stills of a preset, cut around the beam, as Pilatus-style mini-CBF files.
    Returns (paths, labels)."""
    rng = np.random.default_rng(seed)
    preset = presets.get_preset(preset_name)
    paths, labels = [], []
    for k in range(count):
        still = simulate.simulate_still(simulate.sample_shot(preset, rng), rng)
        cx, cy = (int(round(v)) for v in still.beam_centre_px)
        cut = still.image[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2].astype(np.int32)
        cut[~still.mask[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2]] = -1
        px = still.pixel_size_mm
        detector = DetectorFactory.simple(
            "PAD", still.distance_mm, (SIDE / 2 * px, SIDE / 2 * px), "+x", "-y", (px, px), (SIDE, SIDE),
            (-1, preset.saturated_value),
        )
        path = directory / ("shot_%04d.cbf" % (k + 1))
        FormatCBFMini.as_file(detector, BeamFactory.simple(still.wavelength_A), None, None, flex.int(cut), str(path))
        paths.append(path)
        labels.append(still.truth["label"])
    return paths, labels


def import_stills(paths, output):
    """What dials.import does for stills: one experiment (and one-image imageset) per image."""
    from dials.command_line.dials_import import run as dials_import

    dials_import([str(p) for p in paths] + [f"output.experiments={output}", "convert_sequences_to_stills=True",
                                             "output.log=dials.import.log"])
    return output


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("classify")
    paths, labels = write_simulated_cbfs(directory, "LN84", 6, seed=3)
    torch.manual_seed(0)
    save_model(directory / "model.pt", build_network("spotnet"), "spotnet", PARAMS)
    return directory, paths, labels


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_image_once_including_an_unreadable_one(run_dir, tmp_path, monkeypatch):
    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths, "imported.expt")
    # damage one file after import: it is still listed, its pixels can no longer be read
    damaged = paths[2].read_bytes()
    paths[2].write_bytes(damaged[:3000])
    try:
        classify_command.run(["imported.expt", f"model={directory / 'model.pt'}", "threshold=0.0",
                              "output.directory=out", "batch_size=4"])
    finally:
        paths[2].write_bytes(damaged)
    rows = read_csv(tmp_path / "out" / "cnn_classification.csv")
    assert [row["file"] for row in rows] == [str(p) for p in paths]
    assert [row["index"] for row in rows] == ["0"] * 6 and rows[0]["key"] == f"{paths[0]} [1]"
    assert rows[2]["decision"] == "error" and rows[2]["error"] and rows[2]["p_hit"] == ""
    for row in rows[:2] + rows[3:]:
        assert row["decision"] == "Hit" and not row["error"]  # threshold 0: every readable image is kept
        assert sum(float(row[k]) for k in ("p_hit", "p_maybe", "p_miss")) == pytest.approx(1, abs=1e-5)
        assert row["class"] in ("HIT", "MAYBE", "MISS")
    document = json.loads((tmp_path / "out" / "cnn_classification.json").read_text())
    summary = document["summary"]
    assert (summary["images"], summary["errors"], summary["hits"], summary["misses"]) == (6, 1, 5, 0)
    assert summary["images_per_second"] > 0 and document["model"]["architecture"] == "spotnet"
    assert [image["decision"] for image in document["images"]] == [row["decision"] for row in rows]
    hits = ExperimentListFactory.from_json_file(str(tmp_path / "out" / "hits.expt"))
    assert [e.imageset.get_path(0) for e in hits] == [str(p) for k, p in enumerate(paths) if k != 2]
    assert not list(tmp_path.joinpath("out").glob(".*.tmp"))  # atomic writes leave nothing behind


def test_summary_counts_the_vetoed_images_near_the_threshold(run_dir, tmp_path, monkeypatch, caplog):
    """The images a lower threshold would keep first are counted, and the log says which threshold."""
    from dials_cnn.decision import NEAR_THRESHOLD

    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths, "imported.expt")
    model = f"model={directory / 'model.pt'}"
    classify_command.run(["imported.expt", model, "output.directory=first"])
    p = sorted(float(r["p_hit"]) + float(r["p_maybe"]) for r in read_csv(tmp_path / "first" / "cnn_classification.csv"))
    threshold = min(p[len(p) // 2] + 0.01, 0.99)  # at least one image just below it
    near = sum(threshold - NEAR_THRESHOLD < q <= threshold for q in p)
    with caplog.at_level("INFO"):
        classify_command.run(["imported.expt", model, f"threshold={threshold}", "output.directory=second"])
    summary = json.loads((tmp_path / "second" / "cnn_classification.json").read_text())["summary"]
    assert near >= 1 and summary["near_threshold_misses"] == near
    assert f"{near} vetoed image(s) within {NEAR_THRESHOLD:g} of the threshold" in caplog.text
    assert f"threshold={max(threshold - NEAR_THRESHOLD, 0):g} keeps them" in caplog.text


def test_hits_expt_feeds_dials_find_spots(run_dir, tmp_path, monkeypatch):
    from dials.command_line.find_spots import run as find_spots

    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths, "imported.expt")
    classify_command.run(["imported.expt", f"model={directory / 'model.pt'}", "threshold=0.0"])
    find_spots(["hits.expt", "output.reflections=strong.refl", "output.log=find_spots.log"])
    assert (tmp_path / "strong.refl").stat().st_size > 0
    # a threshold above every probability keeps nothing, and the list is still valid
    classify_command.run(["imported.expt", f"model={directory / 'model.pt'}", "threshold=1.0",
                          "output.experiments=none.expt"])
    assert len(ExperimentListFactory.from_json_file("none.expt", check_format=False)) == 0


def test_images_given_directly_and_multi_image_imagesets(run_dir, tmp_path, monkeypatch):
    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    # images on the command line become one 6-image sequence; each image is still classified once
    classify_command.run([str(p) for p in paths] + [f"model={directory / 'model.pt'}", "threshold=0.0"])
    rows = read_csv(tmp_path / "cnn_classification.csv")
    assert [row["file"] for row in rows] == [str(p) for p in paths]
    hits = ExperimentListFactory.from_json_file("hits.expt")
    assert len(hits) == 6 and all(len(e.imageset) == 1 for e in hits)
    assert [e.imageset.get_path(0) for e in hits] == [str(p) for p in paths]


def test_bad_model_files_give_one_clear_error(run_dir, tmp_path, monkeypatch):
    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths[:1], "one.expt")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    with pytest.raises(Sorry, match="junk.pt is not a dials_cnn model file"):
        classify_command.run(["one.expt", "model=junk.pt"])
    payload = torch.load(directory / "model.pt", weights_only=True)
    payload["format_version"] = MODEL_FORMAT_VERSION + 1
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(Sorry, match="future.pt is a dials_cnn model of format version"):
        classify_command.run(["one.expt", "model=future.pt"])
    payload = torch.load(directory / "model.pt", weights_only=True)
    payload["preprocess"]["pipeline"] = "unknown"
    torch.save(payload, tmp_path / "other_preprocessing.pt")
    with pytest.raises(Sorry, match="other_preprocessing.pt: incompatible preprocessing"):
        classify_command.run(["one.expt", "model=other_preprocessing.pt"])
    with pytest.raises(Sorry, match="missing.pt does not exist"):
        classify_command.run(["one.expt", "model=missing.pt"])


def test_without_model_uses_the_default_or_says_to_pass_one(run_dir, tmp_path, monkeypatch):
    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths[:1], "one.expt")
    default = shipped_model_path()
    try:
        classify_command.run(["one.expt"])
    except Sorry as error:
        assert "No default model is installed" in str(error) and "model=" in str(error)
        assert not __import__("os").path.exists(default)
    else:
        assert len(read_csv(tmp_path / "cnn_classification.csv")) == 1


def test_the_fast_shipped_model_is_chosen_by_name(run_dir, tmp_path, monkeypatch):
    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths[:2], "two.expt")
    classify_command.run(["two.expt", "model=fast"])
    summary = json.loads((tmp_path / "cnn_classification.json").read_text())
    assert summary["model"]["path"] == shipped_model_path("fast")
    assert summary["model"]["path"] != shipped_model_path()
    assert len(read_csv(tmp_path / "cnn_classification.csv")) == 2


def test_worker_processes_give_the_same_rows(run_dir, tmp_path, monkeypatch):
    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths, "imported.expt")
    model = f"model={directory / 'model.pt'}"
    classify_command.run(["imported.expt", model, "nproc=1", "output.directory=one"])
    classify_command.run(["imported.expt", model, "nproc=2", "output.directory=two"])
    assert read_csv(tmp_path / "one" / "cnn_classification.csv") == read_csv(tmp_path / "two" / "cnn_classification.csv")


def test_a_worker_process_that_dies_loses_no_image_and_hangs_nothing(run_dir, tmp_path, monkeypatch):
    """A worker killed on an image (as the out-of-memory killer or a crash in a reader's compiled code
    would) once: the image is read again and scored as usual. Killed on it every time: that image alone
    becomes an error row, every other row is what one process gives."""
    import signal

    from dials_cnn import classify

    directory, paths, _ = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths, "imported.expt")
    model = f"model={directory / 'model.pt'}"
    classify_command.run(["imported.expt", model, "nproc=1", "output.directory=one"])
    parent, once = os.getpid(), tmp_path / "killed_once"
    read_and_prepare = classify._read_and_prepare

    def dying(unit, *args, **kwargs):
        if os.getpid() != parent:
            if unit.path == str(paths[1]) or (unit.path == str(paths[4]) and not once.exists()):
                once.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        return read_and_prepare(unit, *args, **kwargs)

    def hung(signum, frame):
        raise TimeoutError("dials.cnn_classify hung after a worker process died")

    monkeypatch.setattr(classify, "_read_and_prepare", dying)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        classify_command.run(["imported.expt", model, "nproc=2", "output.directory=two"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    one, two = read_csv(tmp_path / "one" / "cnn_classification.csv"), read_csv(tmp_path / "two" / "cnn_classification.csv")
    assert once.exists() and len(two) == len(one) == 6
    assert two[1]["decision"] == "error" and "worker process" in two[1]["error"] and two[1]["p_hit"] == ""
    assert two[:1] + two[2:] == one[:1] + one[2:]

def test_multi_image_idh5_file_indices_and_hits(run_dir, tmp_path, monkeypatch):
    """A CXIDB-76 style HDF5 file holding several stills: rows carry the index within the file."""
    from dials_cnn import layouts

    directory, _, _ = run_dir
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(9)
    preset = presets.get_preset("LO19")
    with layouts.Idh5Writer(tmp_path / "run.h5", image_shape=(SIDE, SIDE), pixel_size_mm=0.088,
                            beam_center_mm=(SIDE / 2 * 0.088, SIDE / 2 * 0.088), min_trusted_value=-1,
                            saturated_value=65535, chunk_size=2) as writer:
        for _ in range(5):
            still = simulate.simulate_still(simulate.sample_shot(preset, rng), rng)
            cx, cy = (int(round(v)) for v in still.beam_centre_px)
            writer.append(still.image[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2],
                          still.distance_mm, still.wavelength_A)
    import_stills([tmp_path / "run.h5"], "imported.expt")
    classify_command.run(["imported.expt", f"model={directory / 'model.pt'}", "threshold=0.0"])
    rows = read_csv(tmp_path / "cnn_classification.csv")
    assert [(row["index"], row["image_number"]) for row in rows] == [(str(k), str(k + 1)) for k in range(5)]
    assert rows[3]["key"] == f"{tmp_path / 'run.h5'} [4]"
    hits = ExperimentListFactory.from_json_file("hits.expt")
    assert len(hits) == 5 and len(hits.imagesets()) == 5
    first = hits[0].imageset.get_raw_data(0)[0].as_numpy_array()
    fourth = hits[3].imageset.get_raw_data(0)[0].as_numpy_array()
    reference = ExperimentListFactory.from_filenames([str(tmp_path / "run.h5")])[3].imageset
    np.testing.assert_array_equal(fourth, reference.get_raw_data(0)[0].as_numpy_array())
    assert not np.array_equal(first, fourth)


def test_annotations_give_the_papers_agreement_table_and_expert_labels(run_dir, tmp_path, monkeypatch, caplog):
    from dials_cnn.annotations import write_annotations

    directory, paths, labels = run_dir
    monkeypatch.chdir(tmp_path)
    import_stills(paths, "imported.expt")
    # the expert labelled all but the last image
    annotated = [(str(p), 0, label) for p, label in zip(paths[:-1], labels)]
    write_annotations(tmp_path / "expert_annotation.txt", annotated)
    with caplog.at_level("INFO"):
        classify_command.run(["imported.expt", f"model={directory / 'model.pt'}", "threshold=0.0",
                              "annotations=expert_annotation.txt"])
    rows = read_csv(tmp_path / "cnn_classification.csv")
    assert [row["expert"] for row in rows] == [label for label in labels[:-1]] + [""]
    agreement = json.loads((tmp_path / "cnn_classification.json").read_text())["agreement"]
    # threshold 0 keeps every image: the expert's misses are all kept, hits and maybes all recalled
    n_miss = labels[:-1].count("MISS")
    assert agreement["binary"]["counts"] == [[5 - n_miss, 0], [n_miss, 0]]
    assert np.sum(agreement["three_class_confusion"]) == 5 and agreement["annotated_images"] == 5
    assert "Hit+Maybe recall 100.0 %" in caplog.text and "Expert / CNN" in caplog.text

    # an annotation of an image that is not among the inputs: one Sorry naming it, before classifying
    write_annotations(tmp_path / "other.txt", [(str(directory / "elsewhere.cbf"), 0, "HIT")])
    with pytest.raises(Sorry, match="elsewhere.cbf \\[1\\] is not among the input images"):
        classify_command.run(["imported.expt", f"model={directory / 'model.pt'}", "annotations=other.txt"])


@pytest.mark.parametrize("fixture_name", ["raw_cspad", "cspad_idh5", "rayonix", "small_idh5"])
def test_fast_path_gives_the_predictions_of_the_straightforward_one(fixture_name, request):
    """Crop-only flattening, fused batch-norm, channels-last and worker processes against the whole
    flat image through the plain network: same inputs bit for bit, same decisions, P within 1e-3."""
    from dials_cnn.classify import classify_units, image_units, prepared_inputs
    from dials_cnn.model import ScreeningModel

    from dials_cnn.classify import _LayoutCutReader

    written = request.getfixturevalue(fixture_name)
    units = image_units(ExperimentListFactory.from_filenames([written.path]))
    # the project's single-panel layouts are read region by region, the raw CSPAD through dxtbx
    reader = _LayoutCutReader.for_imageset(units[0].imageset, units[0].path)
    assert (reader is None) == (fixture_name == "raw_cspad")
    if reader is not None:
        # the project's writers store one image per uncompressed chunk: its rows are read at their offset
        chunk, within = reader.layout.locate(units[0].file_index)
        dataset, plain = reader._dataset(chunk)
        offset = reader._image_offset(dataset, within)
        assert plain and offset is not None
        # a cut is a view of the mapped file (no copy): HDF5's own pixels, and those of the copying read
        y0, y1, x0, x1 = 3, dataset.shape[1] - 2, 5, dataset.shape[2] - 4
        cut = (dataset.shape[2], dataset.dtype, y0, y1, x0, x1)
        mapped = reader._mapped_cut(offset, *cut)
        assert mapped is not None and not mapped.flags.owndata and not mapped.flags.writeable
        np.testing.assert_array_equal(mapped, dataset[within, y0:y1, x0:x1])
        np.testing.assert_array_equal(reader._read_plain(offset, *cut), mapped)
        # an image that would end beyond the end of the file (one still being written) is not mapped
        assert reader._mapped_cut(os.path.getsize(written.path), *cut) is None
        pixels = dataset[within, y0:y1, x0:x1]
        reader.close()  # the view holds its own map of the file
        np.testing.assert_array_equal(mapped, pixels)
        del mapped
    for params in (PreprocessParams(pipeline="native", crop=96, bin=2, lcn_window=21),
                   PreprocessParams(pipeline="binned", crop=48, bin=2, pool=2)):
        straight = list(prepared_inputs(units, params, margin=4, crop_only=False))
        fast = list(prepared_inputs(units, params, nproc=2, margin=4, crop_only=True))
        for (_, a, error_a), (_, b, error_b) in zip(straight, fast):
            assert error_a is None and error_b is None
            np.testing.assert_array_equal(a, b)
    torch.manual_seed(1)
    network = build_network("spotnet")
    torch.nn.init.normal_(network.classifier.weight, std=2.0)  # varied probabilities, not all 1/3
    for module in network.modules():  # non-trivial batch-norm statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    params = PreprocessParams(pipeline="native", crop=96, bin=2, lcn_window=21)
    model = ScreeningModel(network, "spotnet", {}, params)
    reference = classify_units(units, model, optimise=False)
    optimised = classify_units(units, model, nproc=2, batch_size=3, optimise=True)
    p_reference = np.array([r.probabilities for r in reference.records])
    p_optimised = np.array([r.probabilities for r in optimised.records])
    np.testing.assert_allclose(p_optimised, p_reference, atol=1e-3, rtol=0)
    assert [r.decision for r in optimised.records] == [r.decision for r in reference.records]
    assert [r.predicted_class for r in optimised.records] == [r.predicted_class for r in reference.records]
    assert all(optimised.seconds[stage] > 0 for stage in ("read", "projection", "preprocess", "network"))


def write_smv(path, image, pixel_mm, distance_mm, wavelength_A, beam_centre_px, byte_order="little_endian"):
    """An ADSC-style SMV file (dxtbx: FormatSMVADSCSN): 512-byte header, then 16-bit pixels."""
    slow, fast = image.shape
    header = (
        "{\nHEADER_BYTES=  512;\nDIM=2;\nBYTE_ORDER=%s;\nTYPE=unsigned_short;\nSIZE1=%d;\nSIZE2=%d;\n"
        "PIXEL_SIZE=%g;\nBIN=none;\nADC=fast;\nDETECTOR_SN=999;\nDATE=Tue Dec  1 12:00:00 2026;\nTIME=0.01;\n"
        "DISTANCE=%.3f;\nOSC_RANGE=0.000;\nPHI=0.000;\nOSC_START=0.000;\nTWOTHETA=0.000;\nAXIS=phi;\n"
        "WAVELENGTH=%.5f;\nBEAM_CENTER_X=%.4f;\nBEAM_CENTER_Y=%.4f;\n}"
        % (byte_order, fast, slow, pixel_mm, distance_mm, wavelength_A,
           beam_centre_px[1] * pixel_mm, beam_centre_px[0] * pixel_mm)  # ADSC: X along slow, Y along fast
    ).encode().ljust(512, b" ")
    dtype = "<u2" if byte_order == "little_endian" else ">u2"
    path.write_bytes(header + np.clip(image, 0, 65535).astype(dtype).tobytes())


def test_smv_files_are_read_straight_from_the_file_with_the_pixels_dxtbx_reads(tmp_path, monkeypatch):
    """Uncompressed SMV (both byte orders) is cut from the file directly, 70x faster than dxtbx's own
    reader; a gzipped one goes through dxtbx. Same pixels, same network inputs either way."""
    import gzip

    from dials_cnn.classify import _SMVCutReader, image_units, prepared_inputs

    monkeypatch.chdir(tmp_path)  # dials.import writes its log here
    rng = np.random.default_rng(5)
    preset = presets.get_preset("LN84")
    paths = []
    for k, order in enumerate(("little_endian", "big_endian", "little_endian")):
        still = simulate.simulate_still(simulate.sample_shot(preset, rng), rng)
        cx, cy = (int(round(v)) for v in still.beam_centre_px)
        cut = still.image[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2]
        path = tmp_path / ("shot_%04d.img" % (k + 1))
        write_smv(path, cut, still.pixel_size_mm, still.distance_mm, still.wavelength_A, (SIDE / 2, SIDE / 2), order)
        paths.append(path)
    gzipped = tmp_path / "shot_0004.img.gz"
    gzipped.write_bytes(gzip.compress(paths[0].read_bytes()))
    experiments = ExperimentListFactory.from_json_file(
        str(import_stills(paths + [gzipped], tmp_path / "imported.expt")), check_format=True)
    units = image_units(experiments)
    assert [u.path for u in units] == [str(p) for p in paths + [gzipped]]
    readers = [_SMVCutReader.for_imageset(u.imageset, u.path, u.position) for u in units]
    assert [r is not None for r in readers] == [True, True, True, False]
    for unit, reader in zip(units[:3], readers):
        whole = unit.imageset.get_raw_data(unit.position)[0].as_numpy_array()
        np.testing.assert_array_equal(reader.read(0, 10, 300, 7, 290), whole[10:300, 7:290])
    straight = list(prepared_inputs(units, PARAMS, margin=4, crop_only=False))
    fast = list(prepared_inputs(units, PARAMS, margin=4, crop_only=True))
    for (_, a, error_a), (_, b, error_b) in zip(straight, fast):
        assert error_a is None and error_b is None
        np.testing.assert_array_equal(a, b)


def write_nxmx(path, stills):
    """Photon-counting stills of one detector as one NXmx (NeXus) file, the way synchrotron Eiger data
    come: a gzip-compressed (image, slow, fast) stack, one detector module, the bad pixels in
    ``pixel_mask``, geometry as NXtransformations (McStas frame: the beam along +z)."""
    import h5py

    first = stills[0]
    slow, fast = first.image.shape
    px, (bx, by) = first.pixel_size_mm, first.beam_centre_px
    with h5py.File(path, "w") as handle:
        entry = handle.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry["definition"] = "NXmx"
        data = entry.create_group("data")
        data.attrs.update(NX_class="NXdata", signal="data")
        data.create_dataset("data", data=np.stack([s.image for s in stills]).astype(np.int32),
                            chunks=(1, slow, fast), compression="gzip")
        instrument = entry.create_group("instrument")
        instrument.attrs["NX_class"] = "NXinstrument"
        beam = instrument.create_group("beam")
        beam.attrs["NX_class"] = "NXbeam"
        beam["incident_wavelength"] = first.wavelength_A
        beam["incident_wavelength"].attrs["units"] = "angstrom"
        detector = instrument.create_group("detector")
        detector.attrs["NX_class"] = "NXdetector"
        detector["depends_on"] = "/entry/instrument/detector/transformations/translation"
        detector["sensor_material"] = "Silicon"
        detector["sensor_thickness"] = 0.45
        detector["sensor_thickness"].attrs["units"] = "mm"
        detector["saturation_value"] = 1000000
        detector["bit_depth_readout"] = 32
        detector["pixel_mask"] = (~first.mask).astype(np.uint32)
        transformations = detector.create_group("transformations")
        transformations.attrs["NX_class"] = "NXtransformations"
        transformations.create_dataset("translation", data=first.distance_mm).attrs.update(
            transformation_type="translation", vector=[0.0, 0.0, 1.0], units="mm", depends_on=".")
        module = detector.create_group("module")
        module.attrs["NX_class"] = "NXdetector_module"
        module["data_origin"] = np.array([0, 0])
        module["data_size"] = np.array([slow, fast])
        module.create_dataset("module_offset", data=0.0).attrs.update(
            transformation_type="translation", vector=[1.0, 0.0, 0.0], units="mm", offset=[bx * px, by * px, 0.0],
            depends_on="/entry/instrument/detector/transformations/translation")
        for name, vector in (("fast_pixel_direction", [-1.0, 0.0, 0.0]), ("slow_pixel_direction", [0.0, -1.0, 0.0])):
            module.create_dataset(name, data=px).attrs.update(
                transformation_type="translation", vector=vector, units="mm", offset=[0.0, 0.0, 0.0],
                depends_on="/entry/instrument/detector/module/module_offset")
        sample = entry.create_group("sample")
        sample.attrs["NX_class"] = "NXsample"
        sample["depends_on"] = "."


def test_an_eiger_nxmx_file_is_classified_through_dxtbx_as_the_stills_were_drawn(tmp_path, monkeypatch):
    """A detector the project has no reader of its own for: dxtbx's FormatNXmx reads an Eiger-like
    NeXus file (compressed stack, module gaps and bad pixels in the file's pixel mask) and
    dials.cnn_classify with the shipped default model gives, row for row, the probabilities of the
    simulated stills preprocessed in memory: geometry, mask and pixels all come through."""
    from dials_cnn.model import load_model
    from dials_cnn.preprocess import prepare
    from dials_cnn.projection import flat_from_array

    monkeypatch.chdir(tmp_path)
    stills = []
    for index in range(40):
        shot = simulate.sample_shot("LO19", simulate.image_rng(11, index), randomise=True, vary_beam_centre=False)
        if shot.family == "eiger":  # one detector per file: the first shots of the Eiger family
            stills.append(simulate.simulate_still(shot, simulate.image_rng(11, index)))
            if len(stills) == 3:
                break
    # hot pixels near the beam, in the pixel mask: read without it, they would be counted as spots
    rng = np.random.default_rng(0)
    bx, by = (int(v) for v in stills[0].beam_centre_px)
    hot_y, hot_x = by + rng.integers(-200, 50, 300), bx + rng.integers(-200, 200, 300)
    for still in stills:
        still.mask[hot_y, hot_x] = False
        still.image[hot_y, hot_x] = 50000
    write_nxmx(tmp_path / "run_master.h5", stills)
    experiments = ExperimentListFactory.from_filenames([str(tmp_path / "run_master.h5")])
    assert experiments[0].imageset.get_format_class().__name__ == "FormatNXmx"
    import_stills([tmp_path / "run_master.h5"], "imported.expt")
    classify_command.run(["imported.expt"])
    rows = read_csv(tmp_path / "cnn_classification.csv")
    assert [int(r["index"]) for r in rows] == [0, 1, 2] and not any(r["error"] for r in rows)
    model = load_model(shipped_model_path())
    network = model.network.eval()
    for row, still in zip(rows, stills):
        flat = flat_from_array(still.image, still.beam_centre_px, still.pixel_size_mm, still.mask)
        x = torch.from_numpy(prepare(flat, model.preprocess).astype(np.float32))[None, None]
        with torch.no_grad():
            expected = network(x).exp()[0].numpy()
        observed = np.array([float(row[k]) for k in ("p_hit", "p_maybe", "p_miss")])
        np.testing.assert_allclose(observed, expected, atol=1e-4)


def test_per_file_cache_is_bounded_and_closes_what_it_drops():
    """Masks and readers are kept per file; a run of single-image files must not keep one per image."""
    from dials_cnn.classify import CACHED_FILES, _cached

    class Reader:
        closed = 0

        def close(self):
            Reader.closed += 1

    cache = {("mask", "a.cbf", None): None}
    for k in range(3 * CACHED_FILES):
        assert isinstance(_cached(cache, ("reader", "f%d" % k), Reader, on_evict=lambda r: r.close()), Reader)
    assert sum(1 for key in cache if key[0] == "reader") == CACHED_FILES
    assert Reader.closed == 2 * CACHED_FILES
    assert ("reader", "f%d" % (3 * CACHED_FILES - 1)) in cache and ("mask", "a.cbf", None) in cache
    made = []
    assert _cached(cache, ("reader", "f%d" % (3 * CACHED_FILES - 1)), lambda: made.append(1)) is not None
    assert not made  # present: not made again


def test_device_selection(run_dir):
    from dials_cnn.classify import DeviceError, resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            resolve_device("cuda")
