import pytest

from dials_cnn.annotations import AnnotationError, image_key, read_annotations, resolve_path, write_annotations


def test_round_trip_in_the_fv5080_format(tmp_path):
    target = tmp_path / "expert_annotation.txt"
    write_annotations(target, [("r0020_2000.h5", 2, "maybe"), ("r0020_2000.h5", 0, "HIT")])
    assert target.read_text() == "r0020_2000.h5 [3] MAYBE\nr0020_2000.h5 [1] HIT\n"
    records = read_annotations(target)
    assert [(r.path, r.index, r.label) for r in records] == [("r0020_2000.h5", 2, "MAYBE"), ("r0020_2000.h5", 0, "HIT")]
    assert resolve_path(target, "r0020_2000.h5") == str(tmp_path / "r0020_2000.h5")
    assert image_key("a.h5", 0) == "a.h5 [1]"


def test_every_bad_line_is_reported_at_once(tmp_path):
    target = tmp_path / "bad.txt"
    target.write_text("a.h5 [1] HIT\na.h5 [1] MISS\na.h5 [2] PERHAPS\nnonsense\na.h5 [0] MISS\n")
    with pytest.raises(AnnotationError) as error:
        read_annotations(target)
    message = str(error.value)
    assert str(target) in message
    assert "line 2: duplicate of line 1" in message
    assert "line 3: unknown label 'PERHAPS'" in message
    assert "line 4" in message and "line 5" in message


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(AnnotationError, match="Cannot read annotation file"):
        read_annotations(tmp_path / "absent.txt")


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "expert_annotation.txt"
    write_annotations(target, [("a.h5", 0, "HIT")])
    with pytest.raises(AnnotationError):
        write_annotations(target, [("a.h5", 0, "HIT"), ("a.h5", 1, "UNSURE")])
    assert target.read_text() == "a.h5 [1] HIT\n"
    assert [p.name for p in tmp_path.iterdir()] == ["expert_annotation.txt"]


def test_outputs_get_ordinary_permissions(tmp_path):
    import os

    target = tmp_path / "expert_annotation.txt"
    write_annotations(target, [("a.h5", 0, "HIT")])
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)
