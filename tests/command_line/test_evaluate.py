"""dials.cnn_evaluate end to end: two runs, two models, the baseline; JSON, HTML and dials.cnn_classify agree."""

import json
import subprocess

import pytest
from dials.util import Sorry

from dials_cnn import report
from dials_cnn.command_line import classify as classify_command
from dials_cnn.command_line import evaluate as evaluate_command
from simulated_runs import tiny_model, write_small_run
from test_report import html_cells


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("evaluate")
    runs = {}
    for name, preset, seed in (("LO19", "LO19", 3), ("LN84", "LN84", 4)):
        (directory / name).mkdir()
        runs[name] = write_small_run(directory / name, preset, n_images=6, seed=seed)
    models = [tiny_model(directory / "first.pt", seed=0), tiny_model(directory / "second.pt", seed=1)]
    out = directory / "out"
    evaluate_command.run(
        [str(runs["LO19"][0]), str(runs["LN84"][0]), f"annotations={runs['LO19'][1]}",
         f"annotations={runs['LN84'][1]}", f"model={models[0]}", f"model={models[1]}", "baseline.preset=LO19",
         # equal to DIALS' default, and still wins over the preset's 200
         "spotfinder.threshold.dispersion.global_threshold=0", "baseline.threshold=2",
         "saliency_images_per_class=1", f"output.directory={out}"]
    )
    document = json.loads((out / "dials.cnn_evaluate.json").read_text())
    return directory, runs, models, out, document


def test_runs_models_and_cross_dataset_matrix(evaluated):
    _, runs, _, _, document = evaluated
    assert [run["name"] for run in document["runs"]] == ["LO19", "LN84"]  # folders of expert_annotation.txt
    assert [m["name"] for m in document["models"]] == ["first", "second"]
    for run, name in zip(document["runs"], ("LO19", "LN84")):
        assert [row["expert"] for row in run["images"]] == runs[name][2]
    cross = document["cross_dataset"]
    assert cross["success_rate"] == [
        [run["cnn"][model]["table3"]["success_rate"] for run in document["runs"]] for model in ("first", "second")
    ]
    assert document["baseline"]["preset"] == "LO19" and document["baseline"]["threshold"] == 2
    assert "gain = 0.19" in document["baseline"]["spotfinder_phil"]
    assert "global_threshold" not in document["baseline"]["spotfinder_phil"]  # back at DIALS' default


def test_numbers_equal_recomputation_and_html(evaluated):
    _, _, _, out, document = evaluated
    for run in document["runs"]:
        recomputed = json.loads(json.dumps(report.recompute_run(run, document["threshold"], 2)))
        for model in ("first", "second"):
            for key in ("table3", "three_class", "per_class", "confidence", "calibration", "operating_curve"):
                assert run["cnn"][model][key] == recomputed["cnn"][model][key]
        for key in ("table3", "spot_counts", "operating_curve"):
            assert run["baseline"][key] == recomputed["baseline"][key]
        for row in run["images"]:
            assert row["baseline_decision"] == ("Hit" if row["spots"] >= 2 else "Miss")
        assert run["cnn"]["first"]["timing"]["images_per_second"] > 0
        assert run["baseline"]["timing"]["images_per_second"] > 0
    text = (out / "dials.cnn_evaluate.html").read_text()
    cells = html_cells(text)
    assert any(path.startswith("cross_dataset/success_rate/1/1") for path, _, _ in cells)
    for path, kind, shown in cells:
        assert shown == report.format_value(report._get(document, path), kind), path


def test_cnn_numbers_are_those_of_dials_cnn_classify(evaluated):
    directory, runs, models, _, document = evaluated
    classify_command.run([str(runs["LO19"][0]), f"model={models[1]}", f"output.directory={directory / 'classified'}"])
    classified = json.loads((directory / "classified" / "cnn_classification.json").read_text())["images"]
    rows = document["runs"][0]["images"]
    assert [row["key"] for row in rows] == [image["key"] for image in classified]
    for row, image in zip(rows, classified):
        cnn = row["cnn"]["second"]
        assert cnn["probabilities"] == pytest.approx([image["p_hit"], image["p_maybe"], image["p_miss"]], abs=1e-6)
        assert cnn["decision"] == image["decision"]


def test_bad_inputs_give_one_clear_error(evaluated, tmp_path):
    _, runs, models, _, _ = evaluated
    h5 = str(runs["LO19"][0])
    with pytest.raises(Sorry, match="annotations="):
        evaluate_command.run([h5, f"model={models[0]}", f"output.directory={tmp_path}"])
    stranger = tmp_path / "labels.txt"
    stranger.write_text("other.h5 [1] HIT\n")
    with pytest.raises(Sorry, match="None of the 6 images is labelled"):
        evaluate_command.run([h5, f"annotations={stranger}", f"model={models[0]}", f"output.directory={tmp_path}"])
    broken = tmp_path / "broken.txt"
    broken.write_text("run.h5 [1] PERHAPS\n")
    with pytest.raises(Sorry, match="unknown label 'PERHAPS'"):
        evaluate_command.run([h5, f"annotations={broken}", f"model={models[0]}", f"output.directory={tmp_path}"])
    with pytest.raises(Sorry, match="not a dials_cnn model file"):
        evaluate_command.run([h5, f"annotations={runs['LO19'][1]}", f"model={broken}", f"output.directory={tmp_path}"])
    assert not (tmp_path / "dials.cnn_evaluate.json").exists()


def test_a_spot_finder_unfit_for_the_detector_is_one_line(evaluated, tmp_path):
    """dials.find_spots refusing the images (more strong pixels than it allows, as with DIALS' default
    gain on a CSPAD) reaches the user of the installed command as one Sorry naming the file."""
    _, runs, models, _, _ = evaluated
    h5, annotations = str(runs["LO19"][0]), str(runs["LO19"][1])
    result = subprocess.run(
        ["dials.cnn_evaluate", h5, f"annotations={annotations}", f"model={models[0]}", "baseline.preset=LO19",
         "spotfinder.threshold.dispersion.global_threshold=0", "spotfinder.filter.max_strong_pixel_fraction=1e-6",
         f"output.directory={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    message = result.stdout + result.stderr
    assert result.returncode == 1
    assert f"Sorry: {h5}: dials.find_spots failed" in message and "baseline.preset=" in message
    assert "Traceback" not in message and "During handling" not in message
    assert not (tmp_path / "dials.cnn_evaluate.json").exists()


def test_training_size_and_contrast_studies(tmp_path):
    """The paper's Tables 7 and 8 on the user's run: models trained on 4 and 10 annotated images, and with
    LCN and linear contrast, all tested on the same test split; every number recomputes from the JSON."""
    from dials_cnn.studies import success_from_probabilities

    h5, annotation, labels = write_small_run(tmp_path, "LO19", n_images=20, seed=6)
    model = tiny_model(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    evaluate_command.run([str(h5), f"annotations={annotation}", f"model={model}", "baseline.enable=False",
                          "study.training_sizes=4,10", "study.contrast=True", "study.epochs=2",
                          "study.batches_per_epoch=2", "study.batch_size=8", "study.max_shift=4",
                          "saliency_images_per_class=0", "tsne.enable=False", f"output.directory={out}"])
    document = json.loads((out / "dials.cnn_evaluate.json").read_text())
    studies = document["runs"][0]["studies"]
    split = studies["split"]
    assert (split["train"], split["validation"], split["test"]) == (10, 4, 6)
    test_labels = [labels[k] for k in split["test_images"]]
    trained = [row["training_images"] for row in studies["training_size"]]
    assert trained and set(trained) <= {4, 10}  # a size whose images hold one class only is skipped
    assert [row["contrast"] for row in studies["contrast"]] == ["lcn", "linear"]
    for row in studies["training_size"] + studies["contrast"]:
        assert len(row["probabilities"]) == 6
        assert row["success_rate"] == pytest.approx(success_from_probabilities(row["probabilities"], test_labels))
    text = (out / "dials.cnn_evaluate.html").read_text()
    assert "paper Table 7" in text and "paper Table 8" in text
    cells = [c for c in html_cells(text) if "/studies/" in c[0]]
    assert cells
    for path, kind, shown in cells:
        assert shown == report.format_value(report._get(document, path), kind), path
    with pytest.raises(Sorry, match="do not fit the training split of 10"):
        evaluate_command.run([str(h5), f"annotations={annotation}", f"model={model}", "baseline.enable=False",
                              "study.training_sizes=11", f"output.directory={tmp_path / 'bad'}"])
