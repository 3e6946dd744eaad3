"""Classification outputs, each written atomically: cnn_classification.json/.csv and hits.expt.

One row per input image: file, 0-based index in the file, the viewer's 1-based image number and key
(``"file [n]"``, as in expert_annotation.txt), P(HIT), P(MAYBE), P(MISS), the most probable class,
the decision (Hit / Miss / error) and the error message of an unreadable image.
"""

import csv
import json

from dxtbx.imageset import ImageSequence
from dxtbx.model import Experiment
from dxtbx.model.experiment_list import ExperimentList

from dials_cnn.annotations import image_key
from dials_cnn.fileio import atomic_path, atomic_write

CSV_COLUMNS = ("file", "index", "image_number", "key", "p_hit", "p_maybe", "p_miss", "class", "decision", "error")


def record_rows(records, expert=None):
    """One output row per record; with ``expert`` ({record position: label}), an ``expert`` column
    ("" where the image was not annotated)."""
    for position, record in enumerate(records):
        p = record.probabilities or (None, None, None)
        row = {
            "file": record.path,
            "index": record.file_index,
            "image_number": record.file_index + 1,
            "key": image_key(record.path, record.file_index),
            "p_hit": p[0],
            "p_maybe": p[1],
            "p_miss": p[2],
            "class": record.predicted_class,
            "decision": record.decision,
            "error": record.error,
        }
        if expert:
            row["expert"] = expert.get(position)
        yield row


def format_csv_row(row):
    """Probabilities with 6 decimals, missing values as empty cells."""
    row = dict(row)
    for name in ("p_hit", "p_maybe", "p_miss"):
        if row[name] is not None:
            row[name] = "%.6f" % row[name]
    return {k: ("" if v is None else v) for k, v in row.items()}


def csv_columns(expert=None):
    return CSV_COLUMNS + (("expert",) if expert else ())


def write_json(path, classification, model_info=None, expert=None, agreement=None, live=None, hot_pixels=None):
    document = {"summary": classification.summary(), "model": model_info or {}}
    if hot_pixels is not None:
        document["hot_pixels"] = hot_pixels
    if agreement is not None:
        document["agreement"] = agreement
    if live is not None:
        document["live"] = live
    document["images"] = list(record_rows(classification.records, expert))
    with atomic_write(path) as handle:
        json.dump(document, handle, indent=1)
        handle.write("\n")


def write_csv(path, classification, expert=None):
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_columns(expert))
        writer.writeheader()
        for row in record_rows(classification.records, expert):
            writer.writerow(format_csv_row(row))


def hits_experiments(experiments, classification):
    """An ExperimentList of only the Hit images, sharing the input's models.

    An input experiment whose imageset is the single hit image is kept as it is; an image of a
    multi-image imageset becomes a one-image experiment (a slice of that imageset, as
    ``dials.import`` makes for stills) with that image's beam and detector.
    """
    hit_keys = {(u.path, u.file_index) for u in classification.hit_units}
    hits = ExperimentList()
    units_by_imageset = {}
    for unit in classification.units:
        units_by_imageset.setdefault(id(unit.imageset), []).append(unit)
    done = set()
    for experiment in experiments:
        imageset = experiment.imageset
        units = units_by_imageset.get(id(imageset), [])
        if len(imageset) == 1:
            if units and (units[0].path, units[0].file_index) in hit_keys:
                hits.append(experiment)
            continue
        if id(imageset) in done:
            continue
        done.add(id(imageset))
        for unit in units:
            if (unit.path, unit.file_index) not in hit_keys:
                continue
            single = imageset[unit.position : unit.position + 1]
            hits.append(
                Experiment(
                    imageset=single,
                    beam=imageset.get_beam(unit.position) or experiment.beam,
                    detector=imageset.get_detector(unit.position) or experiment.detector,
                    goniometer=experiment.goniometer,
                    scan=single.get_scan() if isinstance(single, ImageSequence) else None,
                    crystal=experiment.crystal,
                )
            )
    return hits


def write_hits(path, experiments, classification):
    hits = hits_experiments(experiments, classification)
    with atomic_path(path) as tmp:
        hits.as_json(tmp)
    return hits
