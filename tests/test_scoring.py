"""The scoring session behind dials.cnn_annotate: file contents after every action, resume, undo, order."""

import os

import numpy as np
import pytest

from dials_cnn.annotations import AnnotationError, read_annotations, resolve_path
from dials_cnn.scoring import (
    RUN_ORDER,
    UNCERTAIN_ORDER,
    ScoringError,
    ScoringSession,
    decision_margin,
    image_locations,
    uncertainty_order,
)


@pytest.fixture
def run_images(tmp_path):
    """Four images of one multi-image file, as (absolute path, index in file)."""
    data = tmp_path / "data"
    data.mkdir()
    return [(str(data / "r0020.h5"), index) for index in range(4)]


def read_back(output):
    return [(os.path.basename(r.path), r.index, r.label) for r in read_annotations(str(output))]


def test_every_score_writes_the_whole_file_in_fv5080_format(run_images, tmp_path):
    output = tmp_path / "data" / "expert_annotation.txt"
    session = ScoringSession(output, run_images)
    assert (session.scored, session.total) == (0, 4) and not output.exists()

    session.score(2, "maybe")
    assert output.read_text() == "r0020.h5 [3] MAYBE\n"
    session.score(0, "HIT")
    # this session's images are written in run order, whatever the scoring order
    assert output.read_text() == "r0020.h5 [1] HIT\nr0020.h5 [3] MAYBE\n"
    session.score(2, "MISS")  # re-scoring replaces the line
    assert output.read_text() == "r0020.h5 [1] HIT\nr0020.h5 [3] MISS\n"
    assert (session.scored, session.label(2), session.label(1)) == (2, "MISS", None)
    assert session.key(2) == "r0020.h5 [3]"
    assert read_back(output) == [("r0020.h5", 0, "HIT"), ("r0020.h5", 2, "MISS")]
    assert sorted(os.listdir(output.parent)) == ["expert_annotation.txt"]  # no temporary files left


def test_paths_are_relative_to_the_annotation_file(run_images, tmp_path):
    output = tmp_path / "labels" / "expert.txt"
    output.parent.mkdir()
    session = ScoringSession(output, run_images)
    session.score(1, "HIT")
    assert output.read_text() == "../data/r0020.h5 [2] HIT\n"
    (record,) = read_annotations(str(output))
    assert resolve_path(str(output), record.path) == run_images[1][0]


def test_restart_resumes_and_keeps_other_lines(run_images, tmp_path):
    output = tmp_path / "data" / "expert_annotation.txt"
    absolute = run_images[3][0]
    output.write_text(f"# expert: A. Person\nother.h5 [9] HIT\n{absolute} [4] MISS\nr0020.h5 [1] MAYBE\n")

    session = ScoringSession(output, run_images)
    assert (session.scored, session.label(0), session.label(3)) == (2, "MAYBE", "MISS")
    assert session.first_unscored() == 1
    assert session.can_undo is False and session.undo() is None  # undo belongs to one session
    session.score(1, "HIT")
    session.score(0, "MISS")
    assert output.read_text().splitlines() == [
        "# expert: A. Person",
        "other.h5 [9] HIT",  # an image outside this session: kept as it was
        "r0020.h5 [1] MISS",
        "r0020.h5 [2] HIT",
        f"{absolute} [4] MISS",  # kept as the expert's file wrote it, not duplicated
    ]

    again = ScoringSession(output, run_images)
    assert (again.scored, again.first_unscored()) == (3, 2)
    again.score(2, "HIT")
    assert again.first_unscored() is None
    assert len(read_annotations(str(output))) == 5


def test_a_symlinked_folder_is_the_same_image(run_images, tmp_path):
    linked = tmp_path / "linked"
    linked.symlink_to(tmp_path / "data")
    output = tmp_path / "a.txt"
    output.write_text("linked/r0020.h5 [2] MISS\n")
    session = ScoringSession(output, run_images)
    assert session.label(1) == "MISS" and session.position_of(str(linked / "r0020.h5"), 1) == 1
    session.score(1, "HIT")
    assert output.read_text() == "linked/r0020.h5 [2] HIT\n"  # replaced, not duplicated


def test_undo_restores_the_previous_state_of_the_file(run_images, tmp_path):
    output = tmp_path / "data" / "a.txt"
    session = ScoringSession(output, run_images)
    session.score(0, "HIT")
    session.score(1, "MAYBE")
    session.score(0, "MISS")
    assert session.undo() == 0
    assert read_back(output) == [("r0020.h5", 0, "HIT"), ("r0020.h5", 1, "MAYBE")]
    assert session.undo() == 1
    assert read_back(output) == [("r0020.h5", 0, "HIT")]
    assert session.undo() == 0
    assert output.read_text() == ""
    assert session.undo() is None and session.scored == 0


def test_orders_and_next_image(run_images, tmp_path):
    probabilities = np.array(
        [
            [0.90, 0.05, 0.05],  # sure hit: margin 0.9
            [0.30, 0.20, 0.50],  # undecided: margin 0.0
            [0.05, 0.05, 0.90],  # sure miss: margin 0.8
            [0.10, 0.30, 0.60],  # margin 0.2
        ]
    )
    np.testing.assert_allclose(decision_margin(probabilities), [0.9, 0.0, 0.8, 0.2])
    assert uncertainty_order(probabilities) == [1, 3, 2, 0]
    assert uncertainty_order(np.full((3, 3), 1 / 3)) == [0, 1, 2]  # ties keep run order

    session = ScoringSession(tmp_path / "data" / "a.txt", run_images, probabilities=probabilities)
    assert session.order == [0, 1, 2, 3] and session.next_position(3) is None
    assert session.probabilities_of(1) == pytest.approx((0.3, 0.2, 0.5))
    session.set_order(UNCERTAIN_ORDER)
    assert session.first_unscored() == 1
    session.score(1, "MAYBE")
    assert session.next_position(1) == 3 and session.first_unscored() == 3
    session.set_order(RUN_ORDER)
    assert session.first_unscored() == 0


def test_bad_input_gives_one_clear_error(run_images, tmp_path):
    output = tmp_path / "data" / "a.txt"
    with pytest.raises(ScoringError, match="needs model probabilities"):
        ScoringSession(output, run_images).set_order(UNCERTAIN_ORDER)
    with pytest.raises(ScoringError, match=r"shape \(2, 3\) for 4 images"):
        ScoringSession(output, run_images, probabilities=np.zeros((2, 3)))
    with pytest.raises(ScoringError, match="given twice"):
        ScoringSession(output, run_images + run_images[:1])
    with pytest.raises(ScoringError, match="No images"):
        ScoringSession(output, [])
    with pytest.raises(ScoringError, match="does not exist; create it first"):
        ScoringSession(tmp_path / "missing" / "a.txt", run_images)
    with pytest.raises(ScoringError, match="Unknown label 'PERHAPS'"):
        ScoringSession(output, run_images).score(0, "perhaps")
    assert not output.exists()

    output.write_text("r0020.h5 [1] HIT\nr0020.h5 [1] MISS\n")
    with pytest.raises(AnnotationError, match="duplicate of line 1") as error:
        ScoringSession(output, run_images)
    assert str(output) in str(error.value)
    assert output.read_text() == "r0020.h5 [1] HIT\nr0020.h5 [1] MISS\n"  # never overwritten


def test_a_failed_write_keeps_file_and_state(run_images, tmp_path):
    folder = tmp_path / "data"
    output = folder / "a.txt"
    session = ScoringSession(output, run_images)
    session.score(0, "HIT")
    output.unlink()
    output.mkdir()  # the file's place is taken: the rename fails
    with pytest.raises(ScoringError, match="Cannot write"):
        session.score(1, "MISS")
    assert (session.scored, session.label(1)) == (1, None)
    assert sorted(os.listdir(folder)) == ["a.txt"]  # the temporary file was removed


def write_cbf_run(folder, count=3, size=32):
    """``count`` one-image CBFs imported into one imageset, as dials.import does."""
    from dxtbx.format.FormatCBFMini import FormatCBFMini
    from dxtbx.model.beam import BeamFactory
    from dxtbx.model.detector import DetectorFactory
    from dxtbx.model.experiment_list import ExperimentListFactory
    from scitbx.array_family import flex

    detector = DetectorFactory.simple(
        "PAD", 50.0, (size * 0.05, size * 0.05), "+x", "-y", (0.1, 0.1), (size, size), (-1, 1e6)
    )
    paths = [str(folder / f"shot_{i}.cbf") for i in range(1, count + 1)]
    rng = np.random.default_rng(1)
    for path in paths:
        pixels = flex.int(rng.poisson(5, (size, size)).astype(np.int32))
        FormatCBFMini.as_file(detector, BeamFactory.simple(1.0), None, None, pixels, path)
    (imageset,) = ExperimentListFactory.from_filenames(paths).imagesets()
    return paths, imageset


def test_image_locations_of_one_image_files(tmp_path):
    paths, imageset = write_cbf_run(tmp_path)
    # one image per CBF: each is image 1 of its own file (the viewer's chooser says [1], [2], [3])
    assert image_locations(imageset) == [(path, 0) for path in paths]


def test_model_probabilities_come_from_the_classifier(tmp_path):
    """A real (untrained, seeded) model file through the classifier; an unreadable image is NaN, last."""
    import torch

    from dials_cnn.model import ModelError, build_network, save_model
    from dials_cnn.preprocess import PreprocessParams
    from dials_cnn.scoring import model_probabilities

    paths, imageset = write_cbf_run(tmp_path, count=3, size=64)
    torch.manual_seed(0)
    model_path = str(tmp_path / "model.pt")
    save_model(model_path, build_network("ke2018"), "ke2018", PreprocessParams())
    with open(paths[1], "r+b") as handle:  # damage the second image after import
        handle.truncate(200)

    probabilities, errors = model_probabilities(model_path, [imageset])
    assert probabilities.shape == (3, 3) and list(errors) == [1]
    assert np.isnan(probabilities[1]).all()
    np.testing.assert_allclose(probabilities[[0, 2]].sum(axis=1), 1.0, rtol=1e-5)
    assert uncertainty_order(probabilities)[-1] == 1

    session = ScoringSession(tmp_path / "a.txt", image_locations(imageset))
    session.set_order(RUN_ORDER)
    session.set_probabilities(probabilities)
    session.set_order(UNCERTAIN_ORDER)
    assert session.order[-1] == 1 and np.isnan(session.probabilities_of(1)).all()

    with pytest.raises(ModelError, match="not a dials_cnn model file"):
        model_probabilities(paths[0], [imageset])
