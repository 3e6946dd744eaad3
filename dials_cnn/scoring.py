"""An expert's Hit / Maybe / Miss scoring session, independent of any GUI.

``dials.cnn_annotate`` shows images in ``dials.image_viewer``; this module keeps what the expert
decided. Every change rewrites the whole annotation file atomically in the fv5080 format
(:mod:`dials_cnn.annotations`), so the file on disk is always complete and a restart on the same
file resumes where the expert stopped. Lines for images that are not part of this session (another
run, a previous import) and comment lines are kept, never dropped or duplicated.
"""

import os

import numpy as np

from dials_cnn.annotations import (
    LABELS,
    AnnotationError,
    format_line,
    image_key,
    read_annotations,
    resolve_path,
)
from dials_cnn.fileio import atomic_write

RUN_ORDER = "run"
UNCERTAIN_ORDER = "uncertain"


class ScoringError(ValueError):
    """A scoring session cannot start or an action is invalid; the message says what to do."""


def image_locations(imageset):
    """``(absolute path, 0-based index inside that file)`` for every image of ``imageset``, in order.

    A multi-image file (HDF5) is read through one single-file reader and ``indices()`` are the
    positions inside it; a list of one-image files (CBF) has one file per image, each at index 0.
    """
    single_file = imageset.reader().is_single_file_reader()
    indices = imageset.indices()
    return [
        (os.path.abspath(imageset.get_path(i)), int(indices[i]) if single_file else 0)
        for i in range(len(imageset))
    ]


def model_probabilities(model_path, imagesets, nproc=1, progress=None):
    """Classify every image of ``imagesets`` (viewer order) with the CNN in ``model_path``.

    Returns ``(probabilities, errors)``: an N x 3 array of P(HIT), P(MAYBE), P(MISS) with a NaN row
    for an image that could not be classified, and ``{position: message}`` for those. Uses the
    classifier's own reading, preprocessing and network (``dials_cnn.classify``), so the numbers are
    the ones ``dials.cnn_classify`` reports. A bad model file raises ``dials_cnn.model.ModelError``.
    """
    # torch is imported only when a model is asked for: scoring without one stays light.
    from dials_cnn.classify import ImageUnit, classify_units
    from dials_cnn.model import load_model

    model = load_model(model_path)
    units = [
        ImageUnit(imageset, position, path, file_index)
        for imageset in imagesets
        for position, (path, file_index) in enumerate(image_locations(imageset))
    ]
    classification = classify_units(units, model, nproc=nproc, progress=progress)
    probabilities = np.full((len(units), len(LABELS)), np.nan)
    errors = {}
    for position, record in enumerate(classification.records):
        if record.probabilities is None:
            errors[position] = record.error
        else:
            probabilities[position] = record.probabilities
    return probabilities, errors


def decision_margin(probabilities):
    """How far each image is from the screening decision Hit (HIT + MAYBE) vs MISS: |P(HIT) + P(MAYBE) − P(MISS)|.

    0 means the model cannot decide; 1 means it is certain. ``probabilities`` is N × 3 (HIT, MAYBE, MISS).
    """
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(LABELS):
        raise ScoringError(f"expected N x {len(LABELS)} class probabilities, got shape {probabilities.shape}")
    return np.abs(probabilities[:, 0] + probabilities[:, 1] - probabilities[:, 2])


def uncertainty_order(probabilities):
    """Image positions, most uncertain first (smallest decision margin); ties keep run order.

    Images without probabilities (NaN: could not be classified) come last.
    """
    return [int(i) for i in np.argsort(decision_margin(probabilities), kind="stable")]


class ScoringSession:
    """The labels of ``images`` (viewer order, each ``(absolute path, index in file)``) kept in ``output``.

    Positions are 0-based indices into ``images``, the same as the viewer's image list.
    ``probabilities`` (optional, N × 3 for HIT, MAYBE, MISS) enables :data:`UNCERTAIN_ORDER`.
    """

    def __init__(self, output, images, probabilities=None):
        self.output = os.path.abspath(output)
        self.images = [(os.path.abspath(path), int(index)) for path, index in images]
        if not self.images:
            raise ScoringError("No images to score: give an experiment list or image files with at least one image.")
        self._position = {}
        for position, (path, index) in enumerate(self.images):
            key = (os.path.realpath(path), index)
            if key in self._position:
                # The same image twice would get two lines; the trainer's reader rejects duplicates.
                raise ScoringError(f"Image {path} [{index + 1}] is given twice; import each image only once.")
            self._position[key] = position
        self.order = list(range(len(self.images)))
        self.order_name = RUN_ORDER
        self.probabilities = None
        if probabilities is not None:
            self.set_probabilities(probabilities)
        directory = os.path.dirname(self.output)
        if not os.path.isdir(directory):
            raise ScoringError(f"Cannot write {self.output}: folder {directory} does not exist; create it first.")

        self._labels = [None] * len(self.images)
        self._written_paths = [self._relative_path(path) for path, _ in self.images]
        self._foreign = []  # (path as written, index, label) of images outside this session
        self._comments = []
        self._undo = []
        if os.path.exists(self.output):
            self._load()

    # --- reading -------------------------------------------------------------------------------
    def _relative_path(self, path):
        # Paths relative to the annotation file's folder, as fv5080 wrote them and as the trainer
        # resolves them (annotations.resolve_path): the bare file name when the file sits beside the data.
        return os.path.relpath(path, os.path.dirname(self.output))

    def _load(self):
        records = read_annotations(self.output)  # one AnnotationError listing every bad line
        with open(self.output) as handle:
            self._comments = [line if line.endswith("\n") else line + "\n" for line in handle if line.lstrip().startswith("#")]
        for record in records:
            # Real paths, as dials.cnn_train matches them: a symlinked folder is still the same image.
            key = (os.path.realpath(resolve_path(self.output, record.path)), record.index)
            position = self._position.get(key)
            if position is None:
                self._foreign.append((record.path, record.index, record.label))
            else:
                self._labels[position] = record.label
                self._written_paths[position] = record.path  # keep the line as the expert's file had it

    # --- state ---------------------------------------------------------------------------------
    @property
    def total(self):
        return len(self.images)

    @property
    def scored(self):
        return sum(label is not None for label in self._labels)

    @property
    def can_undo(self):
        return bool(self._undo)

    def label(self, position):
        return self._labels[position]

    def key(self, position):
        """The annotation-file key of an image (``<path> [<1-based index>]``)."""
        return image_key(self._written_paths[position], self.images[position][1])

    def position_of(self, path, index):
        return self._position.get((os.path.realpath(path), int(index)))

    def probabilities_of(self, position):
        """``(P(HIT), P(MAYBE), P(MISS))`` of an image (NaN if it could not be classified), or None without a model."""
        if self.probabilities is None:
            return None
        return tuple(float(p) for p in self.probabilities[position])

    # --- ordering ------------------------------------------------------------------------------
    def set_probabilities(self, probabilities):
        """The model's N x 3 P(HIT), P(MAYBE), P(MISS) for this session's images (viewer order)."""
        probabilities = np.asarray(probabilities, dtype=float)
        if probabilities.shape != (len(self.images), len(LABELS)):
            raise ScoringError(
                f"The model gave probabilities of shape {probabilities.shape} for {len(self.images)} images; "
                f"expected ({len(self.images)}, {len(LABELS)})."
            )
        self.probabilities = probabilities
        if self.order_name == UNCERTAIN_ORDER:
            self.set_order(UNCERTAIN_ORDER)

    def set_order(self, name):
        """Visit images in run order or, with probabilities, most uncertain first."""
        if name == RUN_ORDER:
            self.order = list(range(len(self.images)))
        elif name == UNCERTAIN_ORDER:
            if self.probabilities is None:
                raise ScoringError("The 'most uncertain first' order needs model probabilities (give model=).")
            self.order = uncertainty_order(self.probabilities)
        else:
            raise ScoringError(f"Unknown order {name!r}; use {RUN_ORDER!r} or {UNCERTAIN_ORDER!r}.")
        self.order_name = name

    def next_position(self, position):
        """The image after ``position`` in the current order, or None at the end."""
        step = self.order.index(position) + 1
        return self.order[step] if step < len(self.order) else None

    def first_unscored(self):
        """The first unscored image in the current order, or None when all are scored."""
        for position in self.order:
            if self._labels[position] is None:
                return position
        return None

    # --- changes -------------------------------------------------------------------------------
    def score(self, position, label):
        """Label an image (re-scoring replaces its line) and write the file."""
        label = label.upper()
        if label not in LABELS:
            raise ScoringError(f"Unknown label {label!r}; use one of {', '.join(LABELS)}.")
        if not 0 <= position < len(self.images):
            raise ScoringError(f"No image at position {position} (0..{len(self.images) - 1}).")
        previous = self._labels[position]
        self._labels[position] = label
        try:
            self.write()
        except BaseException:
            self._labels[position] = previous
            raise
        self._undo.append((position, previous))

    def undo(self):
        """Take back the last score of this session and write the file; return its position (None if nothing to undo)."""
        if not self._undo:
            return None
        position, previous = self._undo[-1]
        current = self._labels[position]
        self._labels[position] = previous
        try:
            self.write()
        except BaseException:
            self._labels[position] = current
            raise
        self._undo.pop()
        return position

    def records(self):
        """``(path as written, index, label)``: other images first (as read), then this session's in viewer order."""
        own = [
            (self._written_paths[position], self.images[position][1], label)
            for position, label in enumerate(self._labels)
            if label is not None
        ]
        return list(self._foreign) + own

    def write(self):
        try:
            with atomic_write(self.output) as handle:
                handle.writelines(self._comments)
                for path, index, label in self.records():
                    handle.write(format_line(path, index, label))
        except OSError as error:
            raise ScoringError(f"Cannot write {self.output}: {error.strerror}; check the folder's permissions.") from None


__all__ = [
    "AnnotationError",
    "RUN_ORDER",
    "UNCERTAIN_ORDER",
    "ScoringError",
    "ScoringSession",
    "decision_margin",
    "image_locations",
    "model_probabilities",
    "uncertainty_order",
]
