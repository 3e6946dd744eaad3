"""dials.cnn_evaluate: the CNN against the dials.find_spots spot-count baseline on expert-annotated images."""

import logging
import os
import sys

import iotbx.phil

import dials.util
from dials.util import log, tabulate
from dials.util.options import ArgumentParser, flatten_experiments
from dials.util.version import dials_version

from dials_cnn.command_line import modified_parameters
from dials_cnn.annotations import AnnotationError
from dials_cnn.baseline import DEFAULT_THRESHOLD, PRESETS, BaselineError, get_preset, spotfinder_diff, spotfinder_params
from dials_cnn.classify import image_units
from dials_cnn.command_line.classify import resolve_model
from dials_cnn.model import ModelError, load_model
from dials_cnn.report import EvaluationError, evaluate, write_html, write_json
from dials_cnn.studies import StudyError
from dials_cnn.training import TrainingRecipe

logger = logging.getLogger("dials.cnn_evaluate")

help_message = """
Compare the CNN screen with what beamlines use today, dials.find_spots and a spot-count threshold,
on images an expert has labelled (fv5080 format: "<file> [<image number>] HIT|MAYBE|MISS"). Both
methods run on the same images in this process; the report shows the paper's tables and figures:
Table 3 for both methods, the CNN's 3x3 matrix and per-class recall/specificity, spot counts per
expert class (Fig. 7), confidence of correct classifications (Fig. 9) and calibration, keep rate
versus hit recall as the threshold moves, saliency maps (Fig. 10), t-SNE of the features (Fig. 11),
images/s of both methods and, with several annotation files (runs) or models, the success rate of
every model on every run (Tables 4-6).

baseline.preset applies the spotfinder parameters and spot-count threshold tuned for one of the
paper's runs (L498 LG36 LN84 LN83 LO19); any spotfinder.* parameter of dials.find_spots overrides it.

Writes dials.cnn_evaluate.html (self-contained) and dials.cnn_evaluate.json (every number, and
every image's expert label, probabilities, spot count and decisions).

Examples::

  dials.cnn_evaluate imported.expt annotations=expert_annotation.txt model=LO19.pt baseline.preset=LO19

  dials.cnn_evaluate run20.expt run87.expt annotations=LO19/expert_annotation.txt \\
      annotations=LG36/expert_annotation.txt model=LO19.pt model=LG36.pt

  dials.cnn_evaluate imported.expt annotations=labels.txt baseline.threshold=25 \\
      spotfinder.threshold.dispersion.gain=0.5

  dials.cnn_evaluate imported.expt annotations=expert_annotation.txt \\
      study.training_sizes=50,100,200 study.contrast=True     # the paper's Tables 7 and 8
"""

phil_scope = iotbx.phil.parse(
    """\
annotations = None
  .type = path
  .multiple = True
  .help = "Expert annotation file(s); each is one run of the report (its folder names the run"
          "when the file is called expert_annotation.txt)."
model = None
  .type = path
  .multiple = True
  .help = "Model file(s) written by dials.cnn_train. Default: the model shipped with dials_cnn."
          "The first one also gets saliency maps and t-SNE."
threshold = 0.5
  .type = float(value_min=0, value_max=1)
  .help = "The CNN keeps an image if P(HIT) + P(MAYBE) > threshold."
baseline {
  enable = True
    .type = bool
  preset = %s
    .type = choice
    .help = "Spotfinder parameters and threshold of one of the paper's runs (Table 2)."
  threshold = None
    .type = int(value_min=0)
    .help = "Hit if the spot count >= threshold. Default: the preset's, or %d without a preset."
}
nproc = 1
  .type = int(value_min=1)
  .help = "Processes for both methods (CNN reading/preprocessing and spot finding)."
nthreads = 1
  .type = int(value_min=1)
  .help = "Torch threads for the network."
batch_size = 16
  .type = int(value_min=1)
saliency_images_per_class = 2
  .type = int(value_min=0)
tsne {
  enable = True
    .type = bool
  max_images = 2000
    .type = int(value_min=5)
}
study {
  training_sizes = None
    .type = ints(value_min=2)
    .help = "Training-size study (paper Table 7): for each size, train a model from scratch on that many"
            "annotated images of each run (from the training half of a seeded 50/20/30 split), with the"
            "first model's architecture and preprocessing, and test it on the run's test split."
  contrast = False
    .type = bool
    .help = "LCN versus linear contrast (paper Table 8): train on the whole training split once with the"
            "first model's preprocessing and once with the other contrast, test both on the test split."
  epochs = 10
    .type = int(value_min=1)
  batches_per_epoch = 20
    .type = int(value_min=1)
  batch_size = 16
    .type = int(value_min=1)
  lr_start = 0.03
    .type = float(value_min=0)
  lr_end = 0.0006
    .type = float(value_min=0)
  max_shift = 16
    .type = int(value_min=0)
  seed = 0
    .type = int
}
output {
  directory = .
    .type = path
  html = dials.cnn_evaluate.html
    .type = str
  json = dials.cnn_evaluate.json
    .type = str
  log = dials.cnn_evaluate.log
    .type = str
}
include scope dials.algorithms.spot_finding.factory.phil_scope
"""
    % (" ".join(["*none"] + list(PRESETS)), DEFAULT_THRESHOLD),
    process_includes=True,
)


def study_options(study):
    """Keyword arguments of dials_cnn.studies.run_studies, or None when no study is asked for."""
    if not study.training_sizes and not study.contrast:
        return None
    recipe = TrainingRecipe(epochs=study.epochs, batches_per_epoch=study.batches_per_epoch,
                            batch_size=study.batch_size, lr_start=study.lr_start, lr_end=study.lr_end,
                            max_shift=study.max_shift, max_grad_norm=10.0)
    return {"training_sizes": list(study.training_sizes or []), "contrast": study.contrast, "recipe": recipe,
            "seed": study.seed}


def model_names(paths):
    """Short unique names for the report: the file names without extension."""
    names = []
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        while name in names:
            name += "+"
        names.append(name)
    return names


@dials.util.show_mail_handle_errors()
def run(args=None):
    usage = ("dials.cnn_evaluate imported.expt [...] annotations=expert_annotation.txt [model=model.pt] "
             "[baseline.preset=LO19]")
    if args is None:
        args = sys.argv[1:]
    # A first, data-free pass finds the preset; its spotfinder values become the defaults of the real
    # pass, so that any spotfinder.* argument (even one equal to DIALS' default) wins over the preset.
    quick_parser = ArgumentParser(usage=usage, phil=phil_scope, epilog=help_message)
    quick, _ = quick_parser.parse_args(args=args, quick_parse=True)
    preset_name = None if quick.baseline.preset in (None, "none") else quick.baseline.preset
    master = phil_scope.fetch(source=iotbx.phil.parse(get_preset(preset_name).phil())) if preset_name else phil_scope
    parser = ArgumentParser(
        usage=usage,
        phil=master,
        read_experiments=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=help_message,
    )
    params, options = parser.parse_args(args=args, show_diff_phil=False)
    os.makedirs(params.output.directory, exist_ok=True)
    log.config(verbosity=options.verbose, logfile=os.path.join(params.output.directory, params.output.log))
    logger.info(dials_version())
    diff_phil = modified_parameters(master, params)
    if diff_phil:
        logger.info("The following parameters have been modified:\n%s", diff_phil)

    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0:
        parser.print_help()
        return
    if not params.annotations:
        raise dials.util.Sorry("No expert labels: pass annotations=<expert_annotation.txt> (fv5080 format)")

    import torch

    torch.set_num_threads(params.nthreads)
    model_paths = [resolve_model(p) for p in (params.model or [None])]
    models = {}
    for name, path in zip(model_names(model_paths), model_paths):
        try:
            models[name] = load_model(path)
        except ModelError as error:
            raise dials.util.Sorry(str(error)) from None

    baseline_params = threshold = spotfinder_text = None
    if params.baseline.enable:
        spotfinder_scope = [o for o in parser.phil.objects if o.name == "spotfinder"]
        user_spotfinder = [iotbx.phil.parse(o.as_str()) for o in spotfinder_scope]
        user_spotfinder.append(iotbx.phil.parse(f"spotfinder.mp.nproc = {params.nproc}"))
        try:
            baseline_params = spotfinder_params(None, user_spotfinder)
            spotfinder_text = spotfinder_diff(None, user_spotfinder)
        except BaselineError as error:
            raise dials.util.Sorry(str(error)) from None
        threshold = params.baseline.threshold
        if threshold is None:
            threshold = get_preset(preset_name).threshold if preset_name else DEFAULT_THRESHOLD
        logger.info("Baseline: dials.find_spots%s, Hit if spots >= %d", f" preset {preset_name}" if preset_name else "",
                    threshold)

    if options.verbose < 1:
        # spot finding logs every image at info level; the summary lines below are enough
        for name in ("dials.algorithms", "dials.array_family"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        document, saliency_images = evaluate(
            image_units(experiments), params.annotations, models, threshold=params.threshold,
            baseline_params=baseline_params, baseline_threshold=threshold, baseline_preset=preset_name,
            spotfinder_phil=spotfinder_text, batch_size=params.batch_size, nproc=params.nproc,
            saliency_per_class=params.saliency_images_per_class, tsne=params.tsne.enable,
            tsne_max_images=params.tsne.max_images, studies=study_options(params.study), log=logger.info,
        )
    except (AnnotationError, BaselineError, EvaluationError, StudyError) as error:
        raise dials.util.Sorry(str(error)) from None
    document["parameters"] = diff_phil

    html_path = os.path.join(params.output.directory, params.output.html)
    json_path = os.path.join(params.output.directory, params.output.json)
    write_json(json_path, document)
    write_html(html_path, document, saliency_images)

    rows = []
    for run_ in document["runs"]:
        for name, analysis in run_["cnn"].items():
            t = analysis["table3"]
            rows.append([run_["name"], f"CNN {name}", run_["n_images"], _pc(t["hit_maybe_recall"]),
                         _pc(t["miss_specificity"]), _pc(t["success_rate"]), _pc(t["keep_rate"]),
                         "%.1f" % (analysis["timing"]["images_per_second"] or 0)])
        if "baseline" in run_:
            t = run_["baseline"]["table3"]
            rows.append([run_["name"], f"spots >= {threshold}", run_["n_images"], _pc(t["hit_maybe_recall"]),
                         _pc(t["miss_specificity"]), _pc(t["success_rate"]), _pc(t["keep_rate"]),
                         "%.1f" % (run_["baseline"]["timing"]["images_per_second"] or 0)])
    logger.info("\n" + tabulate(rows, headers=["run", "method", "images", "Hit+Maybe recall", "Miss specificity",
                                               "success", "kept", "images/s"]))
    logger.info("Saved %s and %s", html_path, json_path)


def _pc(value):
    return "-" if value is None else "%.1f %%" % (100 * value)


if __name__ == "__main__":
    run()
