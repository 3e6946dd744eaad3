"""Training studies of ``dials.cnn_evaluate`` on the user's own annotated run: the paper's Table 7 (how
many expert labels a model needs) and Table 8 (LCN versus linear contrast).

Both follow the paper: the annotated images are split 50/20/30 (seeded); models are trained from
scratch with the architecture and preprocessing of the evaluated model and a short recipe, on ``n``
images drawn at random from the training half (nested: each size holds the smaller ones; Table 7),
or on all of it with LCN and with linear contrast (Table 8), and all are tested on the same test
split. Every test image's probabilities are kept, so each number can be recomputed from the JSON.
"""

import dataclasses
import time

import numpy as np

from dials_cnn.classify import read_inputs
from dials_cnn.decision import hit_decisions
from dials_cnn.model import CLASS_NAMES, architecture_defaults
from dials_cnn.training import DataSet, TrainingRecipe, classification_metrics, predict_inputs, split_indices, train


class StudyError(ValueError):
    """A study that cannot be run on these images (too few, a size larger than the training split)."""


def run_studies(units, labels, model, training_sizes=(), contrast=False, recipe=None, seed=0, nproc=1,
                threshold=0.5, log=None):
    """Table 7 (``training_sizes``) and Table 8 (``contrast``) on annotated ``units`` with expert ``labels``
    (class names); ``model``: the evaluated :class:`~dials_cnn.model.ScreeningModel`, whose architecture
    and preprocessing are trained. Returns the JSON-ready ``{"split", "training_size", "contrast"}``."""
    log = log or (lambda text: None)
    recipe = recipe or TrainingRecipe(epochs=10, batches_per_epoch=20, batch_size=16, lr_start=0.03, lr_end=6e-4,
                                      max_shift=16, max_grad_norm=10.0)
    label_index = np.array([CLASS_NAMES.index(label) for label in labels])
    train_idx, val_idx, test_idx = split_indices(len(units), (0.5, 0.2, 0.3), seed)
    sizes = sorted({int(n) for n in training_sizes})
    if len(test_idx) == 0 or len(val_idx) == 0:
        raise StudyError(f"{len(units)} annotated images are too few for a 50/20/30 split")
    too_large = [n for n in sizes if n > len(train_idx) or n < 2]
    if too_large:
        raise StudyError(f"training size(s) {too_large} do not fit the training split of {len(train_idx)} "
                         f"images (half of the {len(units)} annotated images); choose 2..{len(train_idx)}")
    result = {"split": {"seed": seed, "train": len(train_idx), "validation": len(val_idx), "test": len(test_idx),
                        "test_images": [int(k) for k in test_idx]},
              "recipe": recipe.to_dict(), "threshold": threshold, "training_size": [], "contrast": []}
    preprocesses = [model.preprocess]
    if contrast:
        other = "linear" if model.preprocess.contrast == "lcn" else "lcn"
        preprocesses.append(dataclasses.replace(model.preprocess, contrast=other))
    margin = recipe.max_shift
    # nested training sets (each size holds the smaller ones), drawn at random from the training half
    order = np.random.default_rng(seed).permutation(train_idx)
    for preprocess in preprocesses:
        log(f"Studies: preprocessing {len(units)} images ({preprocess.pipeline}, contrast {preprocess.contrast})")
        inputs, errors = read_inputs(units, preprocess, margin=margin, nproc=nproc)
        if errors:
            raise StudyError(f"{len(errors)} annotated image(s) cannot be read; fix or drop their annotation lines")
        data = DataSet(inputs, label_index)
        runs = [("training_size", n) for n in sizes] if preprocess is model.preprocess else []
        if contrast:
            runs.append(("contrast", len(train_idx)))
        for study, n in runs:
            chosen = order[:n]
            if len(np.unique(label_index[chosen])) < 2:
                log(f"  {study} n={n}: one class only in its training images; not trained")
                continue
            started = time.time()
            trained = train(data.subset(chosen), data.subset(val_idx), architecture=model.architecture,
                            architecture_kwargs=model.architecture_kwargs
                            or architecture_defaults(model.architecture, preprocess),
                            preprocess=preprocess, recipe=recipe, seed=seed, log=lambda line: None)
            probabilities = predict_inputs(trained.model.network, data.inputs[test_idx], preprocess.crop)
            metrics = classification_metrics(probabilities, label_index[test_idx], threshold)
            hit = hit_decisions(probabilities, threshold)
            positive = label_index[test_idx] != CLASS_NAMES.index("MISS")
            row = {"training_images": int(n), "contrast": preprocess.contrast,
                   "success_rate": float((hit == positive).mean()),
                   "hit_maybe_recall": metrics["hit_maybe_recall"], "miss_specificity": metrics["miss_specificity"],
                   "accuracy": metrics["accuracy"], "train_seconds": round(time.time() - started, 1),
                   "probabilities": np.round(probabilities, 6).tolist()}
            result[study].append(row)
            log(f"  {study}: {n} training images, contrast {preprocess.contrast}: success "
                f"{100 * row['success_rate']:.1f} % on {len(test_idx)} test images")
    return result


def success_from_probabilities(probabilities, labels, threshold=0.5):
    """The success rate (Hit+Maybe vs Miss agreement) recomputed from stored probabilities."""
    labels = np.asarray([CLASS_NAMES.index(label) if isinstance(label, str) else label for label in labels])
    hit = hit_decisions(np.asarray(probabilities), threshold)
    return float((hit == (labels != CLASS_NAMES.index("MISS"))).mean())
