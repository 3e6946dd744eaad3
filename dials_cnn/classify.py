"""The classification engine: every image of an experiment list -> probabilities and a decision.

Each distinct image (file, index in file) is read once, flattened (:mod:`dials_cnn.projection`),
preprocessed with the model's own parameters and pushed through the network in batches. An image
that cannot be read or preprocessed becomes a record with its error and decision ``"error"``: every
input image is accounted for exactly once, in input order.
"""

import dataclasses
import logging
import multiprocessing
import time

import numpy as np
import torch

from dials_cnn.decision import argmax_classes, hit_decisions
from dials_cnn.model import CLASS_NAMES
from dials_cnn.preprocess import prepare
from dials_cnn.projection import flatten_image, static_mask

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageUnit:
    """One image to classify: where it is in the input and in its file."""

    imageset: object
    position: int  # index within ``imageset``
    path: str
    file_index: int  # 0-based index of the image within its file


@dataclasses.dataclass
class ImageRecord:
    path: str
    file_index: int
    probabilities: tuple = None  # (P(HIT), P(MAYBE), P(MISS)), None on error
    predicted_class: str = None
    decision: str = "error"  # "Hit", "Miss" or "error"
    error: str = None


@dataclasses.dataclass
class Classification:
    records: list
    units: list
    threshold: float
    seconds: dict  # wall time per stage: read+preprocess, network, total

    @property
    def hit_units(self):
        return [u for u, r in zip(self.units, self.records) if r.decision == "Hit"]

    def summary(self):
        counts = {name: 0 for name in CLASS_NAMES}
        decisions = {"Hit": 0, "Miss": 0, "error": 0}
        for record in self.records:
            decisions[record.decision] += 1
            if record.predicted_class:
                counts[record.predicted_class] += 1
        classified = decisions["Hit"] + decisions["Miss"]
        total = self.seconds.get("total", 0.0)
        return {
            "images": len(self.records),
            "classified": classified,
            "errors": decisions["error"],
            "class_counts": counts,
            "hits": decisions["Hit"],
            "misses": decisions["Miss"],
            "hit_rate": decisions["Hit"] / classified if classified else None,
            "threshold": self.threshold,
            "seconds": dict(self.seconds),
            "images_per_second": len(self.records) / total if total > 0 else None,
        }


def image_units(experiments):
    """Every distinct image referenced by ``experiments`` (an ExperimentList), in input order."""
    units = []
    seen = set()
    for imageset in experiments.imagesets():
        single_file = imageset.data().has_single_file_reader()
        indices = list(imageset.indices())
        for position in range(len(imageset)):
            path = imageset.get_path(position)
            file_index = int(indices[position]) if single_file else 0
            key = (path, file_index)
            if key in seen:
                continue
            seen.add(key)
            units.append(ImageUnit(imageset, position, path, file_index))
    return units


def _read_and_prepare(unit, params, masks, margin=0):
    """The network input of one unit, or the error message why there is none."""
    try:
        key = id(unit.imageset)
        if key not in masks:
            masks[key] = static_mask(unit.imageset)
        flat = flatten_image(unit.imageset, unit.position, masks[key])
        return prepare(flat, params, margin=margin), None
    except Exception as error:  # any unreadable image is reported, never fatal
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"{type(error).__name__}: {message}"


# Worker state for nproc > 1 (fork: the units list is inherited, never pickled).
_WORKER = {}


def _worker_prepare(position):
    array, error = _read_and_prepare(_WORKER["units"][position], _WORKER["params"], _WORKER["masks"],
                                     _WORKER["margin"])
    return position, array, error


def prepared_inputs(units, params, nproc=1, margin=0):
    """Yield (position, input array or None, error or None) for ``units``, in input order."""
    if nproc <= 1 or len(units) < 2:
        masks = {}
        for position, unit in enumerate(units):
            yield (position,) + _read_and_prepare(unit, params, masks, margin)
        return
    _WORKER.update(units=units, params=params, masks={}, margin=margin)
    context = multiprocessing.get_context("fork")
    try:
        with context.Pool(nproc, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield from pool.imap(_worker_prepare, range(len(units)), chunksize=4)
    finally:
        _WORKER.clear()


def classify_units(units, model, threshold=0.5, batch_size=16, nproc=1, progress=None):
    """Classify ``units`` (from :func:`image_units`) with a :class:`~dials_cnn.model.ScreeningModel`."""
    network = model.network.eval()
    params = model.preprocess
    records = [None] * len(units)
    seconds = {"read_preprocess": 0.0, "network": 0.0}
    started = time.time()
    batch, batch_positions = [], []

    def flush():
        if not batch:
            return
        t = time.time()
        with torch.no_grad():
            probabilities = network(torch.from_numpy(np.stack(batch))[:, None]).exp().numpy().astype(np.float64)
        seconds["network"] += time.time() - t
        hits = hit_decisions(probabilities, threshold)
        classes = argmax_classes(probabilities)
        for k, position in enumerate(batch_positions):
            unit = units[position]
            records[position] = ImageRecord(
                unit.path, unit.file_index, tuple(float(v) for v in probabilities[k]), str(classes[k]),
                "Hit" if hits[k] else "Miss", None,
            )
        batch.clear()
        batch_positions.clear()

    t = time.time()
    for done, (position, array, error) in enumerate(prepared_inputs(units, params, nproc), start=1):
        if error is not None:
            unit = units[position]
            records[position] = ImageRecord(unit.path, unit.file_index, error=error)
        else:
            batch.append(array)
            batch_positions.append(position)
        if len(batch) >= batch_size:
            seconds["read_preprocess"] += time.time() - t
            flush()
            t = time.time()
        if progress is not None:
            progress(done, len(units))
    seconds["read_preprocess"] += time.time() - t
    flush()
    seconds["total"] = time.time() - started
    return Classification(records, units, threshold, seconds)


def classify_experiments(experiments, model, threshold=0.5, batch_size=16, nproc=1, progress=None):
    """Classify every image of an ExperimentList."""
    return classify_units(image_units(experiments), model, threshold, batch_size, nproc, progress)


def read_inputs(units, params, margin=0, dtype=np.float16, nproc=1):
    """Preprocessed inputs (N, crop + 2 margin, same) of ``units`` for training, and {position: error}."""
    side = params.crop + 2 * margin
    inputs = np.zeros((len(units), side, side), dtype=dtype)
    errors = {}
    for position, array, error in prepared_inputs(units, params, nproc, margin):
        if error is not None:
            errors[position] = error
        else:
            inputs[position] = array
    return inputs, errors
