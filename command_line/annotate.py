# LIBTBX_SET_DISPATCHER_NAME dials.cnn_annotate
"""Score images Hit / Maybe / Miss by eye in dials.image_viewer, writing training labels."""

import logging
import os
import sys

import iotbx.phil

import dials.util
import dials.util.log
from dials.util import Sorry
from dials.util.options import ArgumentParser, flatten_reflections

from dials_cnn.command_line import modified_parameters

logger = logging.getLogger("dials.cnn_annotate")

help_message = """
Open dials.image_viewer with a scoring panel and label each image HIT, MAYBE or MISS
(paper rule: HIT >= 10 recognisable Bragg spots, MAYBE 4-9, MISS otherwise).

Keys in the viewer window: j HIT, k MAYBE, l MISS (each advances to the next image),
u undo the last score, f jump to the first unscored image. The viewer's own tools
(zoom, brightness, settings, spot overlays with a reflection file) work as usual.

Every score rewrites output= atomically in the fv5080 format '<file> [<image number>] LABEL',
the file that dials.cnn_train reads. Running again on the same output resumes at the first
unscored image; lines for other images in that file are kept.

With model=, the CNN's probabilities for the current image are shown and order=uncertain
visits the images the model is least sure about first.

Examples::

  dials.cnn_annotate imported.expt output=expert_annotation.txt

  dials.cnn_annotate imported.expt strong.refl output=expert_annotation.txt

  dials.cnn_annotate imported.expt model=model.pt order=uncertain
"""

phil_scope = iotbx.phil.parse(
    """\
output = expert_annotation.txt
  .type = path
  .help = "Annotation file (fv5080 format); created, or resumed if it exists."
model = None
  .type = path
  .help = "Optional trained CNN: show its probabilities and allow order=uncertain."
nproc = 1
  .type = int(value_min=1)
  .help = "Processes reading and preprocessing images for the model."
order = *run uncertain
  .type = choice
  .help = "Visit images in run order, or most uncertain first (needs model=)."
viewer {
  include scope dials.command_line.image_viewer.phil_scope
}
""",
    process_includes=True,
)


def classify_for_scoring(model_path, imagesets, nproc):
    """Run the CNN over every image once, before the viewer opens; a bad model file is one Sorry."""
    import time

    from dials_cnn.model import ModelError
    from dials_cnn.scoring import model_probabilities

    total = sum(len(imageset) for imageset in imagesets)
    logger.info("Classifying %d images with %s ...", total, model_path)
    started = time.time()

    def progress(done, total):
        if done % 100 == 0 or done == total:
            logger.info("  %d / %d images classified", done, total)

    try:
        probabilities, errors = model_probabilities(model_path, imagesets, nproc=nproc, progress=progress)
    except ModelError as error:
        raise Sorry(str(error)) from None
    logger.info("Classified %d images in %.1f s", total, time.time() - started)
    for position, message in sorted(errors.items())[:10]:
        logger.warning("Image %d could not be classified: %s", position + 1, message)
    if errors:
        logger.warning("%d image(s) could not be classified; they come last in order=uncertain.", len(errors))
    return probabilities


@dials.util.show_mail_handle_errors()
def run(args=None):
    from dials_cnn.annotations import AnnotationError
    from dials_cnn.scoring import (
        RUN_ORDER,
        UNCERTAIN_ORDER,
        ScoringError,
        ScoringSession,
        image_locations,
    )

    usage = "dials.cnn_annotate imported.expt [strong.refl] [output=expert_annotation.txt] [model=model.pt]"
    parser = ArgumentParser(
        usage=usage,
        phil=phil_scope,
        read_experiments=True,
        read_reflections=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=help_message,
    )
    params, options = parser.parse_args(args, show_diff_phil=False)
    dials.util.log.config(verbosity=options.verbose, logfile="dials.cnn_annotate.log")
    dials.util.log.print_banner()
    diff_phil = modified_parameters(phil_scope, params)
    if diff_phil:
        logger.info("The following parameters have been modified:\n%s", diff_phil)

    experiments = [item.data for item in params.input.experiments]
    if not experiments or not any(len(experiment_list) for experiment_list in experiments):
        parser.print_help()
        sys.exit(0)
    reflections = flatten_reflections(params.input.reflections)
    if params.order == UNCERTAIN_ORDER and not params.model:
        raise Sorry("order=uncertain needs model= (a trained CNN from dials.cnn_train).")
    for experiment_list in experiments:
        for experiment in experiment_list:
            if experiment.imageset is None or experiment.detector is None or experiment.beam is None:
                raise Sorry("Every experiment needs images, a detector and a beam; run dials.import on the images first.")

    # The viewer shows the distinct imagesets in this order (SpotFrame); the session must match it.
    imagesets = []
    for experiment_list in experiments:
        imagesets.extend(experiment_list.imagesets())
    images = [location for imageset in imagesets for location in image_locations(imageset)]
    # Everything that can fail fast does so before the (possibly long) classification.
    try:
        session = ScoringSession(params.output, images)
    except (AnnotationError, ScoringError) as error:
        raise Sorry(str(error)) from None
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise Sorry("No display to open the image viewer on: set DISPLAY, or run under a virtual X server: xvfb-run -a dials.cnn_annotate ...")
    if params.model:
        session.set_probabilities(classify_for_scoring(params.model, imagesets, params.nproc))
    session.set_order(params.order or RUN_ORDER)
    logger.info(
        "Scoring %d images into %s (%d already scored); keys: j HIT, k MAYBE, l MISS, u undo, f first unscored",
        session.total,
        os.path.abspath(params.output),
        session.scored,
    )
    viewer_params = params.viewer
    if viewer_params.mask is not None:
        import pickle

        with open(viewer_params.mask, "rb") as handle:
            viewer_params.mask = pickle.load(handle)

    from dials_cnn.viewer_plugin import run_annotation_viewer

    try:
        run_annotation_viewer(viewer_params, experiments, reflections, session)
    except ScoringError as error:
        raise Sorry(str(error)) from None
    logger.info("%d / %d images scored in %s", session.scored, session.total, session.output)


if __name__ == "__main__":
    run()
