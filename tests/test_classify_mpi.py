"""mp.method=mpi: `mpirun -n 2 dials.cnn_classify` gives one output identical to a single process."""

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_cnn import layouts, presets, simulate
from dials_cnn.classify import rank_block
from dials_cnn.command_line import classify as classify_command
from dials_cnn.model import build_network, save_model
from dials_cnn.preprocess import PreprocessParams

SIDE = 192
MPIRUN = shutil.which("mpirun") or "mpirun"  # Open MPI, installed by `make` (openmpi-bin)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """Seven simulated LO19 stills cut around the beam in two idh5 files, imported as dials.import does."""
    directory = tmp_path_factory.mktemp("mpi")
    preset = presets.get_preset("LO19")
    pixel_mm = simulate.detector_frame(preset.family).pixel_size_mm
    paths = []
    for name, indices in (("a.h5", range(0, 4)), ("b.h5", range(4, 7))):
        path = directory / name
        with layouts.Idh5Writer(path, image_shape=(SIDE, SIDE), pixel_size_mm=pixel_mm,
                                beam_center_mm=(SIDE / 2 * pixel_mm,) * 2, min_trusted_value=preset.min_trusted_value,
                                saturated_value=preset.saturated_value, chunk_size=2) as writer:
            for index in indices:
                still = simulate.simulate_image(preset, 5, index)
                cx, cy = (int(round(v)) for v in still.beam_centre_px)
                writer.append(still.image[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2],
                              still.distance_mm, still.wavelength_A)
        paths.append(path)
    torch.manual_seed(0)
    network = build_network("spotnet", widths=(4, 8, 8, 8))
    torch.nn.init.normal_(network.classifier.weight, std=2.0)
    save_model(directory / "model.pt", network, "spotnet", PreprocessParams(pipeline="native", crop=48, bin=2),
               architecture_kwargs={"widths": [4, 8, 8, 8]})
    subprocess.run(["/usr/bin/dials.import"] + [str(p) for p in paths] + ["output.experiments=imported.expt"],
                   cwd=directory, check=True, capture_output=True)
    return directory


def test_rank_blocks_cover_every_image_once():
    for n in (0, 1, 7, 100):
        for size in (1, 2, 3, 8):
            blocks = [rank_block(n, rank, size) for rank in range(size)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def test_mpirun_two_ranks_give_the_single_process_output(small_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = f"model={small_run / 'model.pt'}"
    expt = str(small_run / "imported.expt")
    classify_command.run([expt, model, "threshold=0.4", "output.directory=single"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-m",
         "dials_cnn.command_line.classify", expt, model, "threshold=0.4", "mp.method=mpi", "output.directory=mpi"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "MPI: 2 ranks" in result.stdout
    single, mpi = read_csv(tmp_path / "single" / "cnn_classification.csv"), read_csv(tmp_path / "mpi" / "cnn_classification.csv")
    assert len(single) == 7 and mpi == single
    hits = [ExperimentListFactory.from_json_file(str(tmp_path / d / "hits.expt"), check_format=False)
            for d in ("single", "mpi")]
    assert [(e.imageset.get_path(0), e.imageset.indices()[0]) for e in hits[1]] == \
        [(e.imageset.get_path(0), e.imageset.indices()[0]) for e in hits[0]]
    assert not (tmp_path / "dials.cnn_classify.log").exists()  # only rank 0 logs, into output.directory
