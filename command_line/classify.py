"""dials.cnn_classify: Hit / Maybe / Miss probabilities for every image, and a hits-only experiment list."""

import logging
import os

import iotbx.phil

import dials.util
from dials.util import log, tabulate
from dials.util.options import ArgumentParser, flatten_experiments
from dials.util.version import dials_version

import dials_cnn
from dials_cnn.classify import classify_experiments
from dials_cnn.model import CLASS_NAMES, ModelError, load_model
from dials_cnn.output import write_csv, write_hits, write_json

logger = logging.getLogger("dials.cnn_classify")


help_message = """
Classify serial-crystallography stills as Hit, Maybe or Miss with a convolutional neural network
(Ke et al. 2018) and write the images classified Hit (P(HIT) + P(MAYBE) > threshold) to hits.expt,
ready for dials.find_spots / dials.stills_process.

Every input image gets one row in cnn_classification.csv / .json: file, index, P(HIT), P(MAYBE),
P(MISS), decision (Hit, Miss, or error for an unreadable image). Without model= the default model
shipped with dials_cnn is used.

Examples::

  dials.cnn_classify imported.expt

  dials.cnn_classify imported.expt model=my_endstation.pt threshold=0.3 nproc=2
"""

phil_scope = iotbx.phil.parse(
    """\
model = None
  .type = path
  .help = "Model file written by dials.cnn_train. Default: the model shipped with dials_cnn."
threshold = 0.5
  .type = float(value_min=0, value_max=1)
  .help = "An image is a Hit if P(HIT) + P(MAYBE) > threshold (0.5 is the paper's rule);"
          "lower keeps more images (fewer lost hits)."
nproc = 1
  .type = int(value_min=1)
  .help = "Processes reading and preprocessing images."
batch_size = 16
  .type = int(value_min=1)
  .help = "Images per network batch."
nthreads = None
  .type = int(value_min=1)
  .help = "Torch threads for the network (default: torch's choice)."
output {
  directory = .
    .type = path
  json = cnn_classification.json
    .type = str
  csv = cnn_classification.csv
    .type = str
  experiments = hits.expt
    .type = str
    .help = "The images classified Hit."
  log = dials.cnn_classify.log
    .type = str
}
"""
)


def default_model_path():
    """The model shipped inside the package (dials_cnn/data/default_model.pt)."""
    return os.path.join(os.path.dirname(os.path.abspath(dials_cnn.__file__)), "data", "default_model.pt")


def resolve_model(path):
    """The model file to use, or Sorry when none is given and none is shipped."""
    if path:
        return path
    path = default_model_path()
    if not os.path.exists(path):
        raise dials.util.Sorry(
            f"No default model is installed ({path} is missing); pass model=<file written by dials.cnn_train>"
        )
    return path


@dials.util.show_mail_handle_errors()
def run(args=None):
    usage = "dials.cnn_classify [options] imported.expt [model=model.pt] [threshold=0.5] [nproc=N]"
    parser = ArgumentParser(
        usage=usage,
        phil=phil_scope,
        read_experiments=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=help_message,
    )
    params, options = parser.parse_args(args=args, show_diff_phil=False)
    os.makedirs(params.output.directory, exist_ok=True)
    log.config(verbosity=options.verbose, logfile=os.path.join(params.output.directory, params.output.log))
    logger.info(dials_version())
    diff_phil = parser.diff_phil.as_str()
    if diff_phil:
        logger.info("The following parameters have been modified:\n%s", diff_phil)

    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0:
        parser.print_help()
        return

    model_path = resolve_model(params.model)
    try:
        model = load_model(model_path)
    except ModelError as error:
        raise dials.util.Sorry(str(error))
    logger.info("Model %s: architecture %s, preprocessing %s", model_path, model.architecture, model.preprocess.to_dict())
    if params.nthreads:
        import torch

        torch.set_num_threads(params.nthreads)

    def progress(done, total):
        if done == total or done % 500 == 0:
            logger.info("Classified %d / %d images", done, total)

    classification = classify_experiments(
        experiments, model, threshold=params.threshold, batch_size=params.batch_size, nproc=params.nproc,
        progress=progress,
    )

    def out(name):
        return os.path.join(params.output.directory, name)

    model_info = {"path": os.path.abspath(model_path), "architecture": model.architecture,
                  "preprocess": model.preprocess.to_dict(), "metrics": model.metrics}
    write_json(out(params.output.json), classification, model_info)
    write_csv(out(params.output.csv), classification)
    hits = write_hits(out(params.output.experiments), experiments, classification)

    summary = classification.summary()
    for record in classification.records:
        if record.error:
            logger.info("Unreadable: %s [%d]: %s", record.path, record.file_index + 1, record.error)
    rows = [[name, summary["class_counts"][name]] for name in CLASS_NAMES]
    rows += [["Hit (P(HIT)+P(MAYBE) > %g)" % params.threshold, summary["hits"]], ["Miss", summary["misses"]],
             ["unreadable", summary["errors"]], ["total", summary["images"]]]
    logger.info("\n" + tabulate(rows, headers=["class / decision", "images"]))
    if summary["hit_rate"] is not None:
        logger.info("Hit rate: %.1f %%", 100 * summary["hit_rate"])
    seconds = summary["seconds"]
    logger.info(
        "%d images in %.1f s: %.1f images/s (read + preprocess %.1f s, network %.1f s)",
        summary["images"], seconds["total"], summary["images_per_second"] or 0, seconds["read_preprocess"],
        seconds["network"],
    )
    logger.info("Saved %s, %s and %d hit(s) to %s", out(params.output.json), out(params.output.csv), len(hits),
                out(params.output.experiments))


if __name__ == "__main__":
    run()
