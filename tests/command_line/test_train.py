"""dials.cnn_train on real dxtbx files with fv5080 annotations: the model file, and the error paths."""

import os

import numpy as np
import pytest
import torch
from dials.util import Sorry
from dxtbx.format.FormatCBFMini import FormatCBFMini
from dxtbx.model import BeamFactory, DetectorFactory
from scitbx.array_family import flex

from dials_cnn import presets, simulate
from dials_cnn.annotations import write_annotations
from dials_cnn.command_line import classify as classify_command
from dials_cnn.command_line import train as train_command
from dials_cnn.model import load_model

SIDE = 256
TINY = ["architecture=spotnet", "preprocess.pipeline=native", "preprocess.crop=48", "preprocess.bin=2",
        "training.epochs=2", "training.batches_per_epoch=2", "training.batch_size=4", "training.max_shift=4",
        "nthreads=1"]


def write_run(directory, preset_name, count, seed):
    """Simulated stills of a preset cut to SIDE x SIDE around the beam, as mini-CBF files, with an
    fv5080 annotation file of their true labels (paths relative to it, as fv5080 wrote them)."""
    rng = np.random.default_rng(seed)
    preset = presets.get_preset(preset_name)
    records = []
    for k in range(count):
        still = simulate.simulate_still(simulate.sample_shot(preset, rng), rng)
        cx, cy = (int(round(v)) for v in still.beam_centre_px)
        window = np.s_[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2]
        cut = np.where(still.mask[window], still.image[window], -1).astype(np.int32)
        px = still.pixel_size_mm
        detector = DetectorFactory.simple("PAD", still.distance_mm, (SIDE / 2 * px, SIDE / 2 * px), "+x", "-y",
                                          (px, px), (SIDE, SIDE), (-1, preset.saturated_value))
        name = "%s_%04d.cbf" % (preset_name, k + 1)
        FormatCBFMini.as_file(detector, BeamFactory.simple(still.wavelength_A), None, None, flex.int(cut),
                              str(directory / name))
        records.append((name, 0, still.truth["label"]))
    write_annotations(directory / "expert_annotation.txt", records)
    return [directory / name for name, _, _ in records], records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    first = tmp_path_factory.mktemp("L498")
    second = tmp_path_factory.mktemp("LN84")
    return write_run(first, "L498", 6, seed=1), write_run(second, "LN84", 6, seed=2)


def test_trains_on_two_runs_and_writes_model_curve_checkpoint(runs, tmp_path, monkeypatch):
    (paths1, _), (paths2, _) = runs
    monkeypatch.chdir(tmp_path)
    train_command.run([str(p) for p in paths1 + paths2] + TINY + [
        f"annotations={paths1[0].parent / 'expert_annotation.txt'}",
        f"annotations={paths2[0].parent / 'expert_annotation.txt'}",
        "training.balance=group_class", "seed=4", "output.model=endstation.pt",
    ])
    model = load_model("endstation.pt")
    assert model.architecture == "spotnet" and model.preprocess.crop == 48
    assert model.provenance["seed"] == 4 and len(model.provenance["annotations"]) == 2
    assert model.provenance["images"] == 12 and model.provenance["recipe"]["balance"] == "group_class"
    assert model.metrics["test"]["n"] + model.metrics["validation"]["n"] + model.provenance["train"]["n"] == 12
    assert os.path.getsize("training_curve.png") > 1000 and os.path.exists("endstation.pt.checkpoint")
    # resume: the checkpoint is complete, so no epoch is repeated and the model is rewritten
    train_command.run([str(p) for p in paths1 + paths2] + TINY + [
        f"annotations={paths1[0].parent / 'expert_annotation.txt'}",
        f"annotations={paths2[0].parent / 'expert_annotation.txt'}",
        "training.balance=group_class", "seed=4", "output.model=endstation.pt", "resume=True",
    ])
    assert "Resuming from endstation.pt.checkpoint after epoch 2" in open("dials.cnn_train.log").read()
    # the trained model classifies the same kind of images
    classify_command.run([str(p) for p in paths1] + ["model=endstation.pt"])
    assert len(open("cnn_classification.csv").readlines()) == 7


def test_fine_tuning_from_a_model(runs, tmp_path, monkeypatch):
    (paths1, _), _ = runs
    monkeypatch.chdir(tmp_path)
    annotations = f"annotations={paths1[0].parent / 'expert_annotation.txt'}"
    train_command.run([str(p) for p in paths1] + TINY + [annotations, "output.model=base.pt"])
    train_command.run([str(p) for p in paths1] + TINY + [annotations, "init_model=base.pt", "output.model=tuned.pt",
                                                         "training.lr_start=0.001", "training.lr_end=0.001"])
    assert load_model("tuned.pt").provenance["init_model"] == "base.pt"


def test_annotation_problems_are_listed_in_one_error(runs, tmp_path, monkeypatch):
    (paths1, records), _ = runs
    monkeypatch.chdir(tmp_path)
    directory = paths1[0].parent
    bad = tmp_path / "bad_annotation.txt"
    lines = [f"{directory / name} [1] {label}\n" for name, _, label in records[:3]]
    lines += [f"{directory / 'absent.cbf'} [1] HIT\n", f"{directory / records[0][0]} [5] MISS\n"]
    bad.write_text("".join(lines))
    with pytest.raises(Sorry) as error:
        train_command.run([str(p) for p in paths1] + TINY + [f"annotations={bad}"])
    message = str(error.value)
    assert "2 annotation(s) do not match the input images" in message
    assert "absent.cbf [1] is not among the input images" in message
    assert f"{records[0][0]} [5] is not among the input images" in message
    # unknown labels and duplicates: the annotation reader's one error, naming the file
    bad.write_text(f"{directory / records[0][0]} [1] PERHAPS\n{directory / records[1][0]} [1] HIT\n"
                   f"{directory / records[1][0]} [1] MISS\n")
    with pytest.raises(Sorry) as error:
        train_command.run([str(p) for p in paths1] + TINY + [f"annotations={bad}"])
    assert "bad_annotation.txt: 2 bad line(s)" in str(error.value)
    assert "unknown label 'PERHAPS'" in str(error.value) and "duplicate of line 2" in str(error.value)
    # the same image annotated in two files
    other = tmp_path / "again.txt"
    other.write_text(f"{directory / records[0][0]} [1] HIT\n")
    with pytest.raises(Sorry, match="annotated twice"):
        train_command.run([str(p) for p in paths1] + TINY + [f"annotations={directory / 'expert_annotation.txt'}",
                                                             f"annotations={other}"])


def test_unusable_init_model_is_a_clear_error(runs, tmp_path, monkeypatch):
    (paths1, _), _ = runs
    monkeypatch.chdir(tmp_path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(Sorry, match="foreign.pt is not a dials_cnn model file"):
        train_command.run([str(p) for p in paths1] + TINY + [
            f"annotations={paths1[0].parent / 'expert_annotation.txt'}", "init_model=foreign.pt"])
