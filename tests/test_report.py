"""The evaluation report: analyses from first principles, the document against a recomputation from its
own per-image records and against the classifier, and the HTML against the JSON."""

import html.parser
import json

import numpy as np
import pytest
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_cnn import report
from dials_cnn.baseline import spotfinder_params
from dials_cnn.classify import classify_experiments, image_units
from dials_cnn.evaluation import binary_agreement
from dials_cnn.model import load_model
from simulated_runs import SPOTFINDER, tiny_model, write_small_run

EXPERT = ["HIT", "HIT", "MAYBE", "MAYBE", "MISS", "MISS", "MISS", "MISS"]
PROBABILITIES = [
    (0.7, 0.2, 0.1),  # Hit, correct; argmax HIT
    (0.2, 0.2, 0.6),  # Miss: a lost hit; argmax MISS
    (0.1, 0.6, 0.3),  # Hit, correct; argmax MAYBE
    (0.3, 0.3, 0.4),  # Hit (0.6 > 0.5) though argmax MISS
    (0.05, 0.05, 0.9),  # Miss, correct
    (0.1, 0.1, 0.8),  # Miss, correct
    (0.5, 0.1, 0.4),  # Hit: a kept miss; argmax HIT
    (0.0, 0.2, 0.8),  # Miss, correct
]


def test_cnn_analysis_from_first_principles():
    analysis = report.cnn_analysis(EXPERT, PROBABILITIES, 0.5)
    decisions = ["Hit", "Miss", "Hit", "Hit", "Miss", "Miss", "Hit", "Miss"]
    assert analysis["table3"]["counts"] == binary_agreement(EXPERT, decisions).counts.tolist() == [[3, 1], [1, 3]]
    assert analysis["table3"]["hit_maybe_recall"] == 0.75
    assert analysis["table3"]["miss_specificity"] == 0.75
    assert analysis["table3"]["success_rate"] == 0.75
    assert analysis["three_class"]["counts"] == [[1, 0, 1], [0, 1, 1], [1, 0, 3]]
    assert analysis["three_class"]["accuracy"] == 5 / 8
    hit = analysis["per_class"]["HIT"]
    assert (hit["recall"], hit["specificity"], hit["precision"]) == (0.5, 5 / 6, 0.5)
    assert analysis["per_class"]["MISS"]["recall"] == 0.75
    # Fig. 9: P(MISS) of the 3 correct misses, P(H)+P(M) of the 3 correct hit/maybes
    confidence = analysis["confidence"]
    assert confidence["miss"]["n"] == sum(confidence["miss"]["counts"]) == 3
    assert confidence["miss"]["mean"] == pytest.approx((0.9 + 0.8 + 0.8) / 3)
    assert confidence["hit_maybe"]["n"] == 3
    assert confidence["hit_maybe"]["mean"] == pytest.approx((0.9 + 0.7 + 0.6) / 3)
    calibration = analysis["calibration"]
    assert sum(b["n"] for b in calibration["bins"]) == 8
    p = np.array([a + b for a, b, _ in PROBABILITIES])
    observed = np.array([e != "MISS" for e in EXPERT], dtype=float)
    assert calibration["brier_score"] == pytest.approx(np.mean((p - observed) ** 2))
    # the operating curve passes through the chosen threshold's Table 3
    at_half = [c for c in analysis["operating_curve"] if c["threshold"] == 0.5][0]
    assert at_half["keep_rate"] == analysis["table3"]["keep_rate"] == 0.5
    assert at_half["hit_maybe_recall"] == 0.75
    assert analysis["operating_curve"][0]["keep_rate"] == 1.0  # threshold 0 keeps every image


def test_baseline_analysis_and_histogram():
    counts = [40, 3, 12, 20, 0, 25, 1, 2]
    analysis = report.baseline_analysis(EXPERT, counts, 20)
    assert analysis["table3"]["counts"] == [[2, 2], [1, 3]]
    histogram = analysis["spot_counts"]
    assert histogram["edges"][0] == 0 and histogram["edges"][-1] > 40
    assert [sum(histogram["counts"][label]) for label in ("HIT", "MAYBE", "MISS")] == [2, 2, 4]
    at_threshold = [c for c in analysis["operating_curve"] if c["threshold"] == 20][0]
    assert at_threshold["keep_rate"] == analysis["table3"]["keep_rate"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    h5, annotation, labels = write_small_run(directory, n_images=10, seed=2)
    model = load_model(tiny_model(directory / "tiny.pt"))
    experiments = ExperimentListFactory.from_filenames([str(h5)])
    params = spotfinder_params("LO19", SPOTFINDER)
    document, images = report.evaluate(
        image_units(experiments), [str(annotation)], {"tiny": model}, threshold=0.5, baseline_params=params,
        baseline_threshold=3, baseline_preset="LO19", saliency_per_class=1,
    )
    return document, images, experiments, model, labels


def test_document_equals_recomputation_from_its_records(evaluated):
    document, _, _, _, labels = evaluated
    # through JSON, as a user would read it
    document = json.loads(json.dumps(document, allow_nan=False))
    (run,) = document["runs"]
    assert run["n_images"] == 10 and [row["expert"] for row in run["images"]] == labels
    recomputed = report.recompute_run(run, document["threshold"], document["baseline"]["threshold"])
    recomputed = json.loads(json.dumps(recomputed))
    for key in ("table3", "three_class", "per_class", "confidence", "calibration", "operating_curve"):
        assert run["cnn"]["tiny"][key] == recomputed["cnn"]["tiny"][key], key
    for key in ("table3", "spot_counts", "operating_curve"):
        assert run["baseline"][key] == recomputed["baseline"][key], key
    assert document["cross_dataset"]["success_rate"] == [[run["cnn"]["tiny"]["table3"]["success_rate"]]]
    assert run["cnn"]["tiny"]["timing"]["images_per_second"] > 0
    assert run["baseline"]["timing"]["images_per_second"] > 0


def test_probabilities_are_the_classifiers(evaluated):
    document, _, experiments, model, _ = evaluated
    classification = classify_experiments(experiments, model, threshold=0.5)
    rows = document["runs"][0]["images"]
    for row, record in zip(rows, classification.records):
        assert row["cnn"]["tiny"]["probabilities"] == pytest.approx(record.probabilities, abs=1e-6)
        assert row["cnn"]["tiny"]["decision"] == record.decision


def test_saliency_and_tsne(evaluated):
    document, images, _, _, labels = evaluated
    run = document["runs"][0]
    present = sorted(set(labels))
    assert sorted(entry["expert"] for entry in run["saliency"]) == present  # one per class present
    assert len(images[run["name"]]) == len(present)
    for entry in run["saliency"]:
        assert 0 < entry["salient_fraction"] < 0.2  # beyond 3 sigma: a small fraction of the pixels
    tsne = run["tsne"]
    assert len(tsne["coordinates"]) == len(tsne["expert"]) == 10
    assert tsne["n_features"] == 16  # spotnet: mean and max of the last 8 channels


def test_features_are_captured_with_worker_processes_too(evaluated):
    """With nproc > 1 the classification scores in its workers; the t-SNE's features must still come
    back, the same as in one process."""
    _, _, experiments, model, _ = evaluated
    units = image_units(experiments)
    one, features_one = report.classify_with_features(units, model, nproc=1)
    two, features_two = report.classify_with_features(units, model, nproc=2)
    assert features_two.shape == features_one.shape == (10, 16)
    np.testing.assert_allclose(features_two, features_one, atol=1e-5)
    assert [r.decision for r in two.records] == [r.decision for r in one.records]


class _Cells(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self._open = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-json" in attrs:
            self._open = [attrs["data-json"], attrs["data-kind"], ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[2] += data

    def handle_endtag(self, tag):
        if self._open is not None:
            self.cells.append(tuple(self._open))
            self._open = None


def html_cells(text):
    parser = _Cells()
    parser.feed(text)
    return parser.cells


def test_every_number_in_the_html_is_the_jsons(evaluated):
    document, images, _, _, _ = evaluated
    text = report.render_html(document, images)
    cells = html_cells(text)
    assert len(cells) > 40  # speed, two Table 3s, 3x3, per class, calibration, cross-dataset
    for path, kind, shown in cells:
        assert shown == report.format_value(report._get(document, path), kind), path
    assert text.count("data:image/png;base64,") >= 6  # Fig. 7, 9, calibration, curve, t-SNE, saliency
    assert "<script" not in text  # self-contained, nothing to fetch


def test_no_annotated_image_is_one_clear_error(tmp_path, evaluated):
    _, _, experiments, model, _ = evaluated
    other = tmp_path / "expert_annotation.txt"
    other.write_text("elsewhere.h5 [1] HIT\n")
    with pytest.raises(report.EvaluationError, match="None of the 10 images is labelled"):
        report.evaluate(image_units(experiments), [str(other)], {"tiny": model})
