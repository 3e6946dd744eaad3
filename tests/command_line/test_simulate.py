"""dials.cnn_simulate: files, annotations, errors, and what stock DIALS spot finding sees in them."""

import collections
import csv
import os
import subprocess

import pytest

from dials.array_family import flex
from dials.util import Sorry

from dials_cnn import annotations
from dials_cnn.command_line import simulate as command


@pytest.fixture(scope="module")
def lo19_run(tmp_path_factory):
    """A small LO19 run with plenty of each class, written by the command as a user would."""
    directory = tmp_path_factory.mktemp("lo19")
    cwd = os.getcwd()
    os.chdir(directory)  # the command's log file lands here
    try:
        command.run(
            [
                "preset=LO19",
                "n_images=14",
                "seed=5",
                "output.directory=run",
                "preset_override.class_fractions=0.45,0.1,0.45",
            ]
        )
    finally:
        os.chdir(cwd)
    return directory / "run"


def read_truth(directory):
    with open(directory / "truth.csv") as handle:
        return list(csv.DictReader(handle))


def test_command_writes_idh5_annotation_and_truth(lo19_run):
    truth = read_truth(lo19_run)
    records = annotations.read_annotations(lo19_run / "expert_annotation.txt")
    assert len(records) == len(truth) == 14
    assert {r.path for r in records} == {"LO19_seed5.h5"}
    assert [r.label for r in records] == [row["label"] for row in truth]
    assert {row["label"] for row in truth} >= {"HIT", "MISS"}
    log = (lo19_run.parent / "dials.cnn_simulate.log").read_text()
    assert "images/s" in log and "ETA" in log and "Class counts" in log


def strong_spots_per_image(directory, tmp_path):
    """Run the stock /usr/bin/dials.import and dials.find_spots on the run; spots per image."""
    experiments = tmp_path / "imported.expt"
    strong = tmp_path / "strong.refl"
    subprocess.run(
        ["/usr/bin/dials.import", str(directory / "LO19_seed5.h5"), f"output.experiments={experiments}"],
        cwd=tmp_path, check=True, capture_output=True,
    )
    # the Rayonix phosphor correlates neighbouring pixels, so the effective gain is ~2x the
    # per-pixel variance / mean; a few-pixel minimum rejects single noisy pixels (paper Table 2)
    subprocess.run(
        [
            "/usr/bin/dials.find_spots", str(experiments), f"output.reflections={strong}", "nproc=1",
            "spotfinder.threshold.dispersion.gain=0.4", "spotfinder.filter.min_spot_size=4",
        ],
        cwd=tmp_path, check=True, capture_output=True,
    )
    table = flex.reflection_table.from_file(str(strong))
    return collections.Counter(list(table["id"]))


def test_dials_find_spots_finds_many_more_spots_on_hits_than_misses(lo19_run, tmp_path):
    counts = strong_spots_per_image(lo19_run, tmp_path)
    by_label = collections.defaultdict(list)
    for row in read_truth(lo19_run):
        by_label[row["label"]].append(counts.get(int(row["image"]), 0))
    hits, misses = by_label["HIT"], by_label["MISS"]
    assert hits and misses
    assert sum(hits) / len(hits) > 3 * (sum(misses) / len(misses) + 1)
    assert sorted(hits)[len(hits) // 2] > max(sorted(misses)[len(misses) // 2], 2)


def test_show_config_lists_every_preset_knob(capsys):
    with pytest.raises(SystemExit):
        command.run(["-c"])
    shown = capsys.readouterr().out
    for knob in ("preset = L498 LG36 LN84 LN83 *LO19", "n_images", "layout = *idh5 raw_cspad rayonix_binned",
                 "kapton_probability", "water_ring", "low_gain_d_A", "class_fractions"):
        assert knob in shown


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["preset=LO19", "n_images=-4"], "n_images must be a positive integer"),
        (["preset=L498", "output.layout=rayonix_binned"], "preset L498 is a cspad detector; use layout=idh5"),
        (["output.directory=/etc/passwd/run"], "cannot write to output directory /etc/passwd/run"),
        (["preset_override.gain=-2"], "gain must be positive"),
        (["preset_override.water_ring=3"], "water_ring needs 2 numbers"),
    ],
)
def test_bad_parameters_give_one_clear_sorry(tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Sorry, match=message):
        command.run(arguments)


def test_unknown_preset_is_one_line_on_the_command_line(tmp_path):
    result = subprocess.run(
        ["dials.cnn_simulate", "preset=L999", f"output.directory={tmp_path / 'x'}"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert "Not a possible choice for preset: L999" in result.stderr + result.stdout
    assert not (tmp_path / "x").exists()
