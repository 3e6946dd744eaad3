"""Live mode (dials.cnn_classify watch=DIR): files classified as they appear, also while being written;
Ctrl-C stops cleanly with every classified image in the CSV and the JSON."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_cnn import layouts, presets, simulate
from dials_cnn.live import LiveClassifier
from dials_cnn.model import ScreeningModel, build_network, save_model
from dials_cnn.preprocess import PreprocessParams

SIDE = 160
PARAMS = PreprocessParams(pipeline="native", crop=48, bin=2)


def write_idh5(path, indices, seed=7):
    """Simulated LO19 stills ``indices`` (cut around the beam) in one idh5 file; returns the path."""
    preset = presets.get_preset("LO19")
    pixel_mm = simulate.detector_frame(preset.family).pixel_size_mm
    with layouts.Idh5Writer(path, image_shape=(SIDE, SIDE), pixel_size_mm=pixel_mm,
                            beam_center_mm=(SIDE / 2 * pixel_mm,) * 2, min_trusted_value=preset.min_trusted_value,
                            saturated_value=preset.saturated_value, chunk_size=4) as writer:
        for index in indices:
            still = simulate.simulate_image(preset, seed, index)
            cx, cy = (int(round(v)) for v in still.beam_centre_px)
            writer.append(still.image[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2],
                          still.distance_mm, still.wavelength_A)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Complete files to be 'written' into the watched folder: a (3 images), b with 2 then 5 images."""
    directory = tmp_path_factory.mktemp("live_sources")
    torch.manual_seed(0)
    network = build_network("spotnet", widths=(4, 8, 8, 8))
    torch.nn.init.normal_(network.classifier.weight, std=2.0)
    save_model(directory / "model.pt", network, "spotnet", PARAMS, architecture_kwargs={"widths": [4, 8, 8, 8]})
    return {
        "model": directory / "model.pt",
        "a": write_idh5(directory / "a.h5", range(3)),
        "b_short": write_idh5(directory / "b_short.h5", range(3, 5)),
        "b_long": write_idh5(directory / "b_long.h5", range(3, 8)),
    }


def slow_writer(sources, folder, pause=0.6):
    """Like a DAQ: a.h5 arrives in pieces (truncated meanwhile), then b.h5 with 2 images that later
    grows to 5 (an appending writer); a non-image file is ignored."""
    data = sources["a"].read_bytes()
    target = folder / "a.h5"
    with open(target, "wb") as handle:
        for start in range(0, len(data), len(data) // 3 + 1):
            handle.write(data[start : start + len(data) // 3 + 1])
            handle.flush()
            time.sleep(pause)
    (folder / "notes.txt").write_text("not an image")
    shutil.copy(sources["b_short"], folder / ".b.h5.part")
    os.replace(folder / ".b.h5.part", folder / "b.h5")
    time.sleep(3 * pause)
    shutil.copy(sources["b_long"], folder / ".b.h5.part")
    os.replace(folder / ".b.h5.part", folder / "b.h5")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_live_classifier_in_process(sources, tmp_path):
    """The library: a writer thread; stop by idle timeout; each image exactly once, in arrival order."""
    from dials_cnn.model import load_model

    folder = tmp_path / "incoming"
    folder.mkdir()
    model = load_model(sources["model"])
    writer = threading.Thread(target=slow_writer, args=(sources, folder, 0.3))
    writer.start()
    watcher = LiveClassifier(folder, model, tmp_path / "rows.csv", poll_seconds=0.1, idle_timeout=3.0,
                             report_seconds=1.0)
    classification, experiments = watcher.run()
    writer.join()
    rows = read_csv(tmp_path / "rows.csv")
    keys = [(os.path.basename(row["file"]), int(row["index"])) for row in rows]
    assert keys == [("a.h5", k) for k in range(3)] + [("b.h5", k) for k in range(5)]
    assert all(row["decision"] in ("Hit", "Miss") for row in rows)
    assert [(os.path.basename(r.path), r.file_index) for r in classification.records] == keys
    assert sum(len(e.imageset) for e in experiments) >= 2 and watcher.intervals


def test_ctrl_c_stops_cleanly_without_losing_rows(sources, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "dials_cnn.command_line.classify", "watch=incoming", f"model={sources['model']}",
         "live.poll=0.2", "live.report_every=1", "nproc=2", "output.directory=out"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        slow_writer(sources, folder)
        csv_path = tmp_path / "out" / "cnn_classification.csv"
        deadline = time.time() + 120
        while time.time() < deadline and not (csv_path.exists() and len(read_csv(csv_path)) >= 8):
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "Ctrl-C: stopping" in output and "hit rate" in output
    rows = read_csv(csv_path)
    assert sorted((os.path.basename(row["file"]), int(row["index"])) for row in rows) == \
        [("a.h5", k) for k in range(3)] + [("b.h5", k) for k in range(5)]
    document = json.loads((tmp_path / "out" / "cnn_classification.json").read_text())
    assert [(image["file"], image["index"]) for image in document["images"]] == \
        [(row["file"], int(row["index"])) for row in rows]
    assert document["summary"]["images"] == 8 and document["live"]["intervals"]
    hits = ExperimentListFactory.from_json_file(str(tmp_path / "out" / "hits.expt"), check_format=False)
    assert len(hits) == sum(row["decision"] == "Hit" for row in rows)
