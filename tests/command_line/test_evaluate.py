"""dials.cnn_evaluate end to end: two runs, two models, the baseline; JSON, HTML and dials.cnn_classify agree."""

import json

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
