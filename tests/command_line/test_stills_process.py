"""dials.cnn_stills_process: exactly the images dials.cnn_classify keeps reach spot finding (also under MPI)."""

import csv
import json
import os
import shutil
import subprocess

import pytest
from dials.util import Sorry
from dxtbx.model.experiment_list import ExperimentList

from dials_cnn.annotations import image_key
from dials_cnn.command_line import classify as classify_command
from dials_cnn.command_line import stills_process as stills_command
from simulated_runs import tiny_model, write_small_run

# LO19's spotfinder gain; most cut images have too few spots to index, which is fine: what is tested
# is which images reach spot finding
COMMON = ["spotfinder.threshold.dispersion.gain=0.19", "output.experiments_filename=%s_imported.expt"]


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    """A small run, a tiny model, and dials.cnn_classify's decisions at a threshold splitting the run."""
    directory = tmp_path_factory.mktemp("stills")
    h5, _, _ = write_small_run(directory, n_images=8, seed=6)
    model = tiny_model(directory / "tiny.pt", seed=2)
    classify_command.run([str(h5), f"model={model}", f"output.directory={directory / 'probe'}"])
    images = json.loads((directory / "probe" / "cnn_classification.json").read_text())["images"]
    p = sorted(image["p_hit"] + image["p_maybe"] for image in images)
    threshold = round((p[4] + p[5]) / 2, 6)  # about a third kept, like a realistic hit rate
    classify_command.run([str(h5), f"model={model}", f"threshold={threshold}", f"output.directory={directory / 'cnn'}"])
    images = json.loads((directory / "cnn" / "cnn_classification.json").read_text())["images"]
    kept = {image["key"] for image in images if image["decision"] == "Hit"}
    assert 0 < len(kept) < len(images)
    return directory, h5, model, threshold, images, kept


def reached_spot_finding(output_dir):
    """Image keys that stills_process started spot finding on, from its debug logs and our decision tables."""
    key_of_tag = {}
    for name in os.listdir(output_dir):
        if name.startswith("cnn_veto_") and name.endswith(".csv"):
            with open(os.path.join(output_dir, name), newline="") as handle:
                key_of_tag.update({row["tag"]: row for row in csv.DictReader(handle)})
    reached, vetoed = set(), set()
    for name in os.listdir(os.path.join(output_dir, "debug")):
        for line in open(os.path.join(output_dir, "debug", name)).read().splitlines():
            fields = line.split(",")
            if len(fields) < 5:
                continue
            if fields[4] == "spotfind_start":
                reached.add(fields[1])
            elif fields[4].startswith("cnn_veto_"):
                vetoed.add(fields[1])
    return reached, vetoed, key_of_tag


def imported_keys(output_dir):
    keys = set()
    for name in os.listdir(output_dir):
        if name.endswith("_imported.expt"):
            for experiment in ExperimentList.from_file(os.path.join(output_dir, name), check_format=False):
                keys.add(image_key(experiment.imageset.get_path(0), experiment.imageset.indices()[0]))
    return keys


def test_exactly_the_kept_images_are_processed(classified, tmp_path, monkeypatch):
    _, h5, model, threshold, images, kept = classified
    monkeypatch.chdir(tmp_path)
    stills_command.run([str(h5), f"cnn_veto.model={model}", f"cnn_veto.threshold={threshold}", "output.output_dir=out"]
                       + COMMON)
    reached, vetoed, rows = reached_spot_finding("out")
    assert {rows[tag]["key"] for tag in reached} == kept
    assert {rows[tag]["key"] for tag in vetoed} == {image["key"] for image in images} - kept
    assert imported_keys("out") == kept  # a vetoed image is not even in the imported experiments
    by_key = {image["key"]: image for image in images}
    for row in rows.values():
        image = by_key[row["key"]]
        assert float(row["p_hit"]) == pytest.approx(image["p_hit"], abs=1e-5)
        assert row["decision"] == image["decision"]
    log = (tmp_path / "dials.process.log").read_text()
    assert log.count(", skipped\n") == len(images) - len(kept)  # one line per veto
    assert "%d of %d images vetoed" % (len(images) - len(kept), len(images)) in log


def test_disabled_veto_is_plain_stills_process(classified, tmp_path, monkeypatch):
    _, h5, _, _, images, _ = classified
    monkeypatch.chdir(tmp_path)
    stills_command.run([str(h5), "cnn_veto.enable=False", "output.output_dir=out", "dispatch.index=False"] + COMMON)
    reached, vetoed, rows = reached_spot_finding("out")
    assert len(reached) == len(images) and not vetoed and not rows


def test_mpi_ranks_share_the_images_and_veto_the_same(classified, tmp_path):
    _, h5, model, threshold, images, kept = classified
    command = [shutil.which("mpirun"), "--allow-run-as-root", "--oversubscribe", "-n", "2",
               "/usr/bin/python3", "-m", "dials_cnn.command_line.stills_process", str(h5), f"cnn_veto.model={model}",
               f"cnn_veto.threshold={threshold}", "mp.method=mpi", "output.output_dir=out", "dispatch.index=False"]
    result = subprocess.run(command + COMMON, cwd=tmp_path, capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    reached, _, rows = reached_spot_finding(tmp_path / "out")
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("cnn_veto_")) == [
        "cnn_veto_0000.csv", "cnn_veto_0001.csv"]
    assert len(rows) == len(images)
    assert {rows[tag]["key"] for tag in reached} == kept


def test_unusable_model_is_one_clear_error(classified, tmp_path, monkeypatch):
    _, h5, _, _, _, _ = classified
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(Sorry, match="not a dials_cnn model file"):
        stills_command.run([str(h5), f"cnn_veto.model={tmp_path / 'junk.pt'}"])
    with pytest.raises(Sorry, match="does not exist"):
        stills_command.run([str(h5), f"cnn_veto.model={tmp_path / 'missing.pt'}"])
    assert not (tmp_path / "debug").exists()
