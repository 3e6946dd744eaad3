"""Expert annotations in the fv5080 format: one line per image, ``<file> [<1-based index>] LABEL``.

The key ``"%s [%d]" % (path, index + 1)`` is the one ``dials.image_viewer`` shows for an image, so
files written by the paper's expert, by ``dials.cnn_simulate`` and by ``dials.cnn_annotate`` agree.
"""

import collections
import os
import re

from dials_cnn.fileio import atomic_write

LABELS = ("HIT", "MAYBE", "MISS")

Annotation = collections.namedtuple("Annotation", "path index label line_number")

_LINE = re.compile(r"^(?P<path>.+?)\s+\[(?P<number>-?\d+)\]\s+(?P<label>\S+)\s*$")


class AnnotationError(ValueError):
    """A bad annotation file: the message lists every offending line and what to do."""


def image_key(path, index):
    """The viewer's name for image ``index`` (0-based) of ``path``."""
    return "%s [%d]" % (path, index + 1)


def format_line(path, index, label):
    return "%s %s\n" % (image_key(path, index), label.upper())


def read_annotations(filename):
    """Parse ``filename``; return a list of :class:`Annotation` with 0-based indices.

    Paths are returned as written (relative paths are resolved by :func:`resolve_path`). Every
    malformed line, unknown label or duplicate image is collected into one :class:`AnnotationError`.
    """
    problems = []
    records = []
    seen = {}
    try:
        with open(filename) as handle:
            lines = handle.readlines()
    except OSError as error:
        raise AnnotationError(f"Cannot read annotation file {filename}: {error.strerror}") from None
    for number, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        match = _LINE.match(text.rstrip("\n"))
        if not match:
            problems.append(f"line {number}: not '<file> [<image number>] HIT|MAYBE|MISS': {text.strip()!r}")
            continue
        label = match.group("label").upper()
        image_number = int(match.group("number"))
        if label not in LABELS:
            problems.append(f"line {number}: unknown label {match.group('label')!r} (expected HIT, MAYBE or MISS)")
            continue
        if image_number < 1:
            problems.append(f"line {number}: image numbers start at 1, got {image_number}")
            continue
        key = (match.group("path"), image_number - 1)
        if key in seen:
            problems.append(f"line {number}: duplicate of line {seen[key]} ({image_key(*key)})")
            continue
        seen[key] = number
        records.append(Annotation(key[0], key[1], label, number))
    if problems:
        raise AnnotationError(
            f"{filename}: {len(problems)} bad line(s); fix or remove them and run again:\n  "
            + "\n  ".join(problems)
        )
    return records


def resolve_path(annotation_file, path):
    """Annotation paths are relative to the annotation file's folder (as fv5080 wrote them)."""
    if os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(annotation_file)), path))


def write_annotations(filename, records):
    """Write ``(path, index, label)`` triples atomically, in the order given."""
    with atomic_write(filename) as handle:
        for path, index, label in records:
            if label.upper() not in LABELS:
                raise AnnotationError(f"unknown label {label!r} for {image_key(path, index)}")
            handle.write(format_line(path, index, label))
