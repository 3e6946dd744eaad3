"""dials.cnn_train: learn a Hit / Maybe / Miss model from images and expert annotations."""

import collections
import logging
import os

import iotbx.phil
import numpy as np

import dials.util
from dials.util import log, tabulate
from dials.util.options import ArgumentParser, flatten_experiments
from dials.util.version import dials_version

from dials_cnn.command_line import modified_parameters
from dials_cnn.annotations import AnnotationError, image_key, read_annotations, resolve_path
from dials_cnn.classify import image_units, read_inputs
from dials_cnn.default_model import shipped_model_path
from dials_cnn.model import CLASS_NAMES, ModelError, architecture_defaults, load_model
from dials_cnn.preprocess import PreprocessError, PreprocessParams
from dials_cnn.training import DataSet, TrainingError, TrainingRecipe, split_indices, train

logger = logging.getLogger("dials.cnn_train")

help_message = """
Train the screening network on images labelled by an expert (fv5080 annotation format, one line per
image: "<file> [<image number>] HIT|MAYBE|MISS", as written by dials.cnn_annotate or
dials.cnn_simulate). Several runs can be combined by giving several annotation files.

The defaults are the recipe of Ke et al. (2018): SGD (momentum 0.9, weight decay 5e-4), batches of 64
drawn class-balanced, 100 batches per epoch, 120 epochs, learning rate 0.1 -> 1e-4, random shifts of
up to 120 pixels, 50/20/30 train/validation/test split. The annotated images are preprocessed once
and held in memory. A checkpoint is written every epoch (resume=True continues from it).

Writes the model file (weights, preprocessing, provenance, test metrics) and a training-curve PNG.

Examples::

  dials.cnn_train imported.expt annotations=expert_annotation.txt

  dials.cnn_train run1.h5 run2.h5 annotations=run1.txt annotations=run2.txt \\
      architecture=spotnet preprocess.pipeline=binned preprocess.crop=360 preprocess.pool=2 \\
      training.lr_start=0.03 training.lr_end=0.0006 training.max_shift=30 output.model=endstation.pt

  dials.cnn_train imported.expt annotations=new_labels.txt init_model=endstation.pt \\
      training.epochs=20 training.lr_start=0.01
"""

phil_scope = iotbx.phil.parse(
    """\
annotations = None
  .type = path
  .multiple = True
  .help = "Expert annotation file(s), fv5080 format. Paths in them are relative to their folder."
architecture = *ke2018 spotnet spotcount
  .type = choice
  .help = "ke2018: the paper's network; spotnet: the project's finer-detail network;"
          "spotcount: counts spots in the expert's window (the default model's network; fine-tune it"
          "with init_model=)."
preprocess {
  pipeline = *ke2018 native block binned
    .type = choice
    .help = "ke2018: whole image resized to image_size, LCN, crop around the beam;"
            "native: LCN at full resolution around the beam, then bin x bin max-binning;"
            "block: the same with windows aligned to bin x bin blocks (about 3x as fast);"
            "binned: bin x bin photon sums around the beam, then LCN."
  image_size = 960
    .type = int(value_min=8)
  crop = 720
    .type = int(value_min=8)
  bin = 2
    .type = int(value_min=1)
  pool = 1
    .type = int(value_min=1)
    .help = "binned: max-binning after LCN."
  lcn_window = None
    .type = int(value_min=3)
    .help = "LCN window side in pixels (default: the paper's 5; block: 22, i.e. 11 blocks of 2)."
  contrast = *lcn linear
    .type = choice
    .help = "lcn: local contrast normalisation (the paper's); linear: the global z-score alone (Table 8)."
}
training {
  epochs = 120
    .type = int(value_min=1)
  batches_per_epoch = 100
    .type = int(value_min=1)
  batch_size = 64
    .type = int(value_min=1)
  lr_start = 0.1
    .type = float(value_min=0)
  lr_end = 0.0001
    .type = float(value_min=0)
  momentum = 0.9
    .type = float(value_min=0)
  weight_decay = 0.0005
    .type = float(value_min=0)
  max_shift = 120
    .type = int(value_min=0)
    .help = "Largest random shift (pixels of the network input) of the training crops."
  flips = True
    .type = bool
  rot90 = True
    .type = bool
  balance = *class group_class none
    .type = choice
    .help = "class: pick a class uniformly, then an image; group_class: pick an annotation file"
            "first, then a class present in it."
  keep = *best last
    .type = choice
    .help = "Keep the weights of the epoch with the lowest validation loss, or of the last epoch."
}
split {
  fractions = 0.5 0.2 0.3
    .type = floats(size=3, value_min=0)
    .help = "Train / validation / test fractions."
  sequential = False
    .type = bool
    .help = "Split in annotation order (as fv5080 did) instead of a seeded random permutation."
}
seed = 0
  .type = int
resume = False
  .type = bool
  .help = "Continue from output.checkpoint."
init_model = None
  .type = path
  .help = "Start from this model's weights (fine-tuning); its architecture and preprocessing are used. "
          "A file, or a shipped model: default or fast."
nthreads = None
  .type = int(value_min=1)
  .help = "Torch threads (default: torch's choice)."
nproc = 1
  .type = int(value_min=1)
  .help = "Processes reading and preprocessing the images."
output {
  model = model.pt
    .type = path
  curve = training_curve.png
    .type = path
  checkpoint = None
    .type = path
    .help = "Default: the model file name + .checkpoint"
  log = dials.cnn_train.log
    .type = str
}
"""
)


def match_annotations(annotation_files, units):
    """Labels and groups for the annotated units; one Sorry lists every unknown or repeated image."""
    by_key = {(os.path.realpath(u.path), u.file_index): k for k, u in enumerate(units)}
    chosen = collections.OrderedDict()  # unit position -> (label, group)
    problems = []
    for group, filename in enumerate(annotation_files):
        try:
            records = read_annotations(filename)
        except AnnotationError as error:
            raise dials.util.Sorry(str(error)) from None
        for record in records:
            path = os.path.realpath(resolve_path(filename, record.path))
            position = by_key.get((path, record.index))
            where = f"{filename} line {record.line_number}: {image_key(record.path, record.index)}"
            if position is None:
                problems.append(f"{where} is not among the input images")
            elif position in chosen:
                problems.append(f"{where} is annotated twice (also in {annotation_files[chosen[position][1]]})")
            else:
                chosen[position] = (CLASS_NAMES.index(record.label), group)
    if problems:
        raise dials.util.Sorry(
            f"{len(problems)} annotation(s) do not match the input images; pass the images they refer "
            "to or remove those lines:\n  " + "\n  ".join(problems)
        )
    if not chosen:
        raise dials.util.Sorry("No annotations: pass annotations=expert_annotation.txt")
    return chosen


@dials.util.show_mail_handle_errors()
def run(args=None):
    usage = "dials.cnn_train [options] imported.expt|images annotations=expert_annotation.txt"
    parser = ArgumentParser(
        usage=usage,
        phil=phil_scope,
        read_experiments=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=help_message,
    )
    params, options = parser.parse_args(args=args, show_diff_phil=False)
    log.config(verbosity=options.verbose, logfile=params.output.log)
    logger.info(dials_version())
    diff_phil = modified_parameters(phil_scope, params)
    if diff_phil:
        logger.info("The following parameters have been modified:\n%s", diff_phil)
    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0:
        parser.print_help()
        return
    _train(params, experiments)


def _train(params, experiments):
    if params.nthreads:
        import torch

        torch.set_num_threads(params.nthreads)
    init_model = None
    try:
        if params.init_model:
            init_model = load_model(shipped_model_path(params.init_model))
            preprocess, architecture = init_model.preprocess, init_model.architecture
        else:
            preprocess = PreprocessParams(
                pipeline=params.preprocess.pipeline, image_size=params.preprocess.image_size,
                crop=params.preprocess.crop, bin=params.preprocess.bin, pool=params.preprocess.pool,
                lcn_window=params.preprocess.lcn_window
                or (11 * params.preprocess.bin if params.preprocess.pipeline == "block" else 5),
                contrast=params.preprocess.contrast,
            )
            architecture = params.architecture
    except (ModelError, PreprocessError) as error:
        raise dials.util.Sorry(str(error)) from None
    recipe = TrainingRecipe(**{name: getattr(params.training, name) for name in TrainingRecipe().to_dict()
                               if hasattr(params.training, name)})

    units = image_units(experiments)
    chosen = match_annotations(list(params.annotations), units)
    logger.info("%d input images, %d annotated (%s)", len(units), len(chosen), ", ".join(
        "%s %d" % (name, sum(1 for label, _ in chosen.values() if label == k)) for k, name in enumerate(CLASS_NAMES)))
    positions = list(chosen)
    selected = [units[p] for p in positions]
    margin = recipe.max_shift
    logger.info("Preprocessing %d images once (%s, inputs %d px)", len(selected), preprocess.pipeline,
                preprocess.crop + 2 * margin)
    inputs, errors = read_inputs(selected, preprocess, margin=margin, nproc=params.nproc)
    if errors:
        raise dials.util.Sorry(
            f"{len(errors)} annotated image(s) cannot be read; remove their annotation lines or fix the files:\n  "
            + "\n  ".join(f"{image_key(selected[k].path, selected[k].file_index)}: {e}" for k, e in errors.items())
        )
    labels = np.array([chosen[p][0] for p in positions])
    groups = np.array([chosen[p][1] for p in positions])
    names = [image_key(u.path, u.file_index) for u in selected]
    dataset = DataSet(inputs, labels, groups, names)
    train_idx, val_idx, test_idx = split_indices(len(dataset), params.split.fractions, params.seed,
                                                 params.split.sequential)
    logger.info("Split: %d train, %d validation, %d test", len(train_idx), len(val_idx), len(test_idx))
    checkpoint = params.output.checkpoint or params.output.model + ".checkpoint"
    provenance = {
        "annotations": [os.path.abspath(f) for f in params.annotations],
        "images": len(dataset),
        "split": {"fractions": list(params.split.fractions), "sequential": params.split.sequential},
        "command": "dials.cnn_train",
    }
    try:
        result = train(
            dataset.subset(train_idx), dataset.subset(val_idx), architecture=architecture,
            architecture_kwargs=init_model.architecture_kwargs if init_model
            else architecture_defaults(architecture, preprocess), preprocess=preprocess,
            recipe=recipe, seed=params.seed, checkpoint=checkpoint, resume=params.resume, init_model=init_model,
            test_set=dataset.subset(test_idx) if len(test_idx) else None, output=params.output.model,
            curve_png=params.output.curve, provenance=provenance, log=logger.info,
        )
    except (TrainingError, ModelError) as error:
        raise dials.util.Sorry(str(error)) from None
    rows = []
    for name in ("validation", "test"):
        m = result.metrics.get(name)
        if m and m.get("n"):
            rows.append([name, m["n"], "%.3f" % m["loss"], "%.1f" % (100 * m["accuracy"]),
                         "-" if m["hit_maybe_recall"] is None else "%.1f" % (100 * m["hit_maybe_recall"]),
                         "-" if m["miss_specificity"] is None else "%.1f" % (100 * m["miss_specificity"])])
    logger.info("\n" + tabulate(rows, headers=["set", "images", "loss", "accuracy %", "Hit+Maybe recall %",
                                               "Miss specificity %"]))
    logger.info("Kept the weights of epoch %d", result.metrics["kept_epoch"])
    logger.info("Saved the model to %s and the training curve to %s", params.output.model, params.output.curve)


if __name__ == "__main__":
    run()
