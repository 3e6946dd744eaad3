import numpy as np
import pytest

from dials_cnn.evaluation import binary_agreement, format_three_class, three_class_confusion


def test_binary_agreement_groups_hit_and_maybe_like_table_3():
    expert = ["HIT", "MAYBE", "MAYBE", "MISS", "MISS", "MISS", "MISS"]
    decided = ["Hit", "Hit", "Miss", "Miss", "Miss", "Miss", "Hit"]
    agreement = binary_agreement(expert, decided)
    assert agreement.counts.tolist() == [[2, 1], [1, 3]]
    assert agreement.recall == pytest.approx(2 / 3)
    assert agreement.specificity == pytest.approx(3 / 4)
    assert agreement.success_rate == pytest.approx(5 / 7)
    assert agreement.keep_rate == pytest.approx(3 / 7)
    assert "66.7%" in agreement.table() and "75.0%" in agreement.table()
    assert agreement.as_dict()["counts"] == [[2, 1], [1, 3]]


def test_empty_rows_give_nan_not_a_crash():
    agreement = binary_agreement(["MISS"], ["Miss"])
    assert np.isnan(agreement.recall) and agreement.specificity == 1.0


def test_three_class_confusion_rows_are_expert():
    counts = three_class_confusion(["HIT", "MISS", "MISS"], ["HIT", "MAYBE", "MISS"])
    assert counts.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert format_three_class(counts).splitlines()[0].split()[-3:] == ["HIT", "MAYBE", "MISS"]


def test_unknown_decision_is_refused():
    with pytest.raises(ValueError):
        binary_agreement(["HIT"], ["Perhaps"])
