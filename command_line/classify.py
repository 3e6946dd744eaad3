"""dials.cnn_classify: Hit / Maybe / Miss probabilities for every image, and a hits-only experiment list."""

import logging
import os
import time

import iotbx.phil

import dials.util
from dials.util import log, tabulate
from dials.util.options import ArgumentParser, flatten_experiments
from dials.util.version import dials_version

from dials_cnn.command_line import modified_parameters, skip_final_collection_at_exit
from dials_cnn.classify import (
    DeviceError, classify_units, classify_units_mpi, find_run_hot_pixels, image_units, resolve_device,
)
from dials_cnn.command_line.train import match_annotations
from dials_cnn.decision import NEAR_THRESHOLD
from dials_cnn.default_model import shipped_model_path
from dials_cnn.evaluation import binary_agreement, format_three_class, three_class_confusion
from dials_cnn.live import LiveClassifier
from dials_cnn.model import CLASS_NAMES, ModelError, load_model
from dials_cnn.output import write_csv, write_hits, write_json

logger = logging.getLogger("dials.cnn_classify")


help_message = """
Classify serial-crystallography stills as Hit, Maybe or Miss with a convolutional neural network
(Ke et al. 2018) and write the images classified Hit (P(HIT) + P(MAYBE) > threshold) to hits.expt,
ready for dials.find_spots / dials.stills_process.

Every input image gets one row in cnn_classification.csv / .json: file, index, P(HIT), P(MAYBE),
P(MISS), decision (Hit, Miss, or error for an unreadable image). Without model= the default model
shipped with dials_cnn is used; model=fast uses the faster shipped one.

Examples::

  dials.cnn_classify imported.expt

  dials.cnn_classify imported.expt model=my_endstation.pt threshold=0.3 nproc=2

  dials.cnn_classify imported.expt model=fast nproc=2

  dials.cnn_classify imported.expt annotations=expert_annotation.txt

  dials.cnn_classify watch=/path/to/run/folder nproc=2

  mpirun -n 4 dials.cnn_classify imported.expt mp.method=mpi
"""

phil_scope = iotbx.phil.parse(
    """\
model = None
  .type = path
  .help = "Model file written by dials.cnn_train, or a model shipped with dials_cnn: default (None) or fast "
          "(a cheaper network, 10-15 % less CPU per image; it ranks stills as the default does, but at the "
          "same threshold keeps fewer of the weak, broad-spot hits: lower threshold= where they matter)."
threshold = 0.5
  .type = float(value_min=0, value_max=1)
  .help = "An image is a Hit if P(HIT) + P(MAYBE) > threshold (0.5 is the paper's rule);"
          "lower keeps more images (fewer lost hits)."
annotations = None
  .type = path
  .multiple = True
  .help = "Expert annotation file(s) (fv5080 format, e.g. expert_annotation.txt of dials.cnn_simulate):"
          "after classifying, print the agreement with the expert (the paper's Table 3) and add the"
          "expert's label of each annotated image to the outputs."
nproc = 1
  .type = int(value_min=1)
  .help = "Processes reading and preprocessing images (per MPI rank with mp.method=mpi) while the"
          "network runs in the main process."
mp {
  method = *multiprocessing mpi
    .type = choice
    .help = "mpi: split the images across the ranks of mpirun (cctbx.xfel style); rank 0 gathers"
            "them and writes the same outputs a single process would."
}
device = *auto cpu cuda
  .type = choice
  .help = "Where the network runs: auto = a CUDA GPU when torch sees one, else the CPU."
watch = None
  .type = path
  .help = "Live mode: classify image files as they appear in this folder (also files still being"
          "written: each is taken once it can be read and stops growing); rows are appended to the"
          "CSV, the hit rate is logged every live.report_every seconds, Ctrl-C stops cleanly."
live {
  patterns = *.h5 *.nxs *.cbf *.img
    .type = strings
    .help = "File name patterns to watch for."
  poll = 1.0
    .type = float(value_min=0.01)
    .help = "Seconds between looks at the folder."
  report_every = 60
    .type = float(value_min=1)
    .help = "Seconds between hit-rate reports."
  stop_after_idle = None
    .type = float(value_min=0)
    .help = "Stop after this many seconds without new images (default: run until Ctrl-C)."
}
hot_pixels {
  find = True
    .type = bool
    .help = "Mask pixels that are among the brightest of nearly every image (hot, stuck or unmasked"
            "warm pixels), found from the run itself before classifying: the network would count each"
            "as a one-pixel spot. In live mode (watch=): from the first chunk of images of a detector"
            "that holds at least 10 of them."
  sample = 20
    .type = int(value_min=10)
    .help = "Images, spread over the run, on which hot pixels are looked for (per detector)."
  min_fraction = 0.5
    .type = float(value_min=0.05, value_max=1)
    .help = "A pixel is hot if it is among the brightest 0.2 % in at least this fraction of them."
}
batch_size = 16
  .type = int(value_min=1)
  .help = "Images per network batch on a GPU (on the CPU each image goes through the network on its own:"
          "faster there, and the same probabilities however the images are split)."
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


def resolve_model(path):
    """The model file to use (a path, or a shipped model's name), or Sorry when a shipped one is missing."""
    resolved = shipped_model_path(path)
    if resolved != path and not os.path.exists(resolved):
        raise dials.util.Sorry(
            f"No {path or 'default'} model is installed ({resolved} is missing); "
            "pass model=<file written by dials.cnn_train>"
        )
    return resolved


def expert_agreement(classification, expert):
    """Agreement with the expert over the annotated images that could be classified (Table 3 form)."""
    annotated = [(expert[p], classification.records[p]) for p in sorted(expert)]
    classified = [(label, record) for label, record in annotated if record.decision != "error"]
    labels = [label for label, _ in classified]
    binary = binary_agreement(labels, [record.decision for _, record in classified])
    confusion = three_class_confusion(labels, [record.predicted_class for _, record in classified])
    return {
        "annotated_images": len(annotated),
        "unreadable_annotated_images": len(annotated) - len(classified),
        "threshold": classification.threshold,
        "binary": binary.as_dict(),
        "binary_table": binary.table(),
        "three_class_confusion": confusion.tolist(),
        "three_class_table": format_three_class(confusion),
    }


def log_agreement(agreement):
    logger.info(
        "\nAgreement with the expert (%d annotated images, threshold %g; rows: expert, columns: CNN decision):\n%s",
        agreement["annotated_images"] - agreement["unreadable_annotated_images"], agreement["threshold"],
        agreement["binary_table"],
    )
    logger.info("\nThree classes (rows: expert, columns: most probable CNN class):\n%s", agreement["three_class_table"])
    if agreement["unreadable_annotated_images"]:
        logger.info("%d annotated image(s) could not be read and are not counted",
                    agreement["unreadable_annotated_images"])


def log_summary(classification, threshold):
    summary = classification.summary()
    for record in classification.records:
        if record.error:
            logger.info("Unreadable: %s [%d]: %s", record.path, record.file_index + 1, record.error)
    rows = [[name, summary["class_counts"][name]] for name in CLASS_NAMES]
    rows += [["Hit (P(HIT)+P(MAYBE) > %g)" % threshold, summary["hits"]], ["Miss", summary["misses"]],
             ["unreadable", summary["errors"]], ["total", summary["images"]]]
    logger.info("\n" + tabulate(rows, headers=["class / decision", "images"]))
    if summary["hit_rate"] is not None:
        logger.info("Hit rate: %.1f %%", 100 * summary["hit_rate"])
    if summary["near_threshold_misses"]:
        lower = max(threshold - NEAR_THRESHOLD, 0.0)
        logger.info("%d vetoed image(s) within %g of the threshold (P(HIT)+P(MAYBE) > %g): threshold=%g keeps "
                    "them, at the cost of more misses", summary["near_threshold_misses"], NEAR_THRESHOLD, lower, lower)


def log_timing(classification):
    seconds = classification.seconds
    n = max(len(classification.records), 1)
    stages = [(name, seconds[name]) for name in ("read", "projection", "preprocess", "network", "output")
              if name in seconds]
    logger.info(
        "%d images in %.1f s: %.1f images/s; per image (all processes): %s",
        len(classification.records), seconds["total"], len(classification.records) / seconds["total"]
        if seconds.get("total") else 0.0, ", ".join("%s %.1f ms" % (name, 1000 * value / n) for name, value in stages),
    )


def mpi_communicator(method):
    """MPI.COMM_WORLD for mp.method=mpi, else None."""
    if method != "mpi":
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        raise dials.util.Sorry("mp.method=mpi needs mpi4py (Debian: apt-get install python3-mpi4py openmpi-bin)") from None
    return MPI.COMM_WORLD


@dials.util.show_mail_handle_errors()
def run(args=None):
    skip_final_collection_at_exit()
    usage = ("dials.cnn_classify [options] imported.expt|images [model=model.pt] [threshold=0.5] [nproc=N]\n"
             "       dials.cnn_classify watch=DIR [model=model.pt]   (live: classify files as they appear)\n"
             "       mpirun -n N dials.cnn_classify imported.expt mp.method=mpi")
    parser = ArgumentParser(
        usage=usage,
        phil=phil_scope,
        read_experiments=True,
        read_experiments_from_images=True,
        check_format=True,
        epilog=help_message,
    )
    params, options = parser.parse_args(args=args, show_diff_phil=False)
    comm = mpi_communicator(params.mp.method)
    rank = comm.Get_rank() if comm is not None else 0
    if rank == 0:
        os.makedirs(params.output.directory, exist_ok=True)
        log.config(verbosity=options.verbose, logfile=os.path.join(params.output.directory, params.output.log))
        logger.info(dials_version())
        diff_phil = modified_parameters(phil_scope, params)
        if diff_phil:
            logger.info("The following parameters have been modified:\n%s", diff_phil)

    experiments = flatten_experiments(params.input.experiments)
    if len(experiments) == 0 and not params.watch:
        if rank == 0:
            parser.print_help()
        return

    def out(name):
        return os.path.join(params.output.directory, name)

    units = image_units(experiments)
    expert = {}  # unit position -> expert label; checked before the (long) classification
    if params.annotations:
        if params.watch:
            raise dials.util.Sorry("annotations= compares a finished run with the expert; it cannot be combined "
                                   "with watch= (classify the files afterwards with annotations=)")
        chosen = match_annotations(list(params.annotations), units)
        expert = {position: CLASS_NAMES[label] for position, (label, _) in chosen.items()}

    model_path = resolve_model(params.model)
    try:
        model = load_model(model_path)
        device = resolve_device(str(params.device).lower())  # phil reads the choice "auto" as libtbx.Auto
    except (ModelError, DeviceError) as error:
        raise dials.util.Sorry(str(error)) from None
    if rank == 0:
        logger.info("Model %s: architecture %s, preprocessing %s; device %s", model_path, model.architecture,
                    model.preprocess.to_dict(), device)
    if params.nthreads:
        import torch

        torch.set_num_threads(params.nthreads)
    model_info = {"path": os.path.abspath(model_path), "architecture": model.architecture,
                  "preprocess": model.preprocess.to_dict(), "metrics": model.metrics}

    if params.watch:
        if comm is not None:
            raise dials.util.Sorry("watch= runs in one process (use nproc= for more cores), not with mp.method=mpi")
        if not os.path.isdir(params.watch):
            raise dials.util.Sorry(f"watch={params.watch} is not a folder; pass the folder the images are written to")
        watcher = LiveClassifier(
            params.watch, model, out(params.output.csv), threshold=params.threshold, batch_size=params.batch_size,
            nproc=params.nproc, device=device, patterns=params.live.patterns, poll_seconds=params.live.poll,
            idle_timeout=params.live.stop_after_idle, report_seconds=params.live.report_every,
            find_hot_pixels=params.hot_pixels.find, hot_pixel_sample=params.hot_pixels.sample,
            hot_pixel_min_fraction=params.hot_pixels.min_fraction,
        )
        watcher.run()
        classification, experiments = watcher.classification(), watcher.experiments()
        search = watcher.hot_pixel_search
        hot_summary = {"masked": int(sum(mask.sum() for mask in search.hot_pixels.values() if mask is not None)),
                       "reports": search.reports} if search else None
        write_json(out(params.output.json), classification, model_info, live={"intervals": watcher.intervals},
                   hot_pixels=hot_summary)
        hits = write_hits(out(params.output.experiments), experiments, classification)
        log_summary(classification, params.threshold)
        logger.info("Saved %s, %s and %d hit(s) to %s", out(params.output.json), out(params.output.csv), len(hits),
                    out(params.output.experiments))
        return

    def progress(done, total):
        if done == total or done % 500 == 0:
            logger.info("Classified %d / %d images%s", done, total, f" (rank {rank})" if comm is not None else "")

    started = time.perf_counter()
    hot, reports = None, []
    if params.hot_pixels.find:
        # every rank finds the same mask from the same sampled images: MPI outputs stay identical
        hot, reports = find_run_hot_pixels(units, model.preprocess, params.hot_pixels.sample,
                                           params.hot_pixels.min_fraction, nproc=params.nproc)
        if rank == 0:
            for line in reports:
                logger.info(line)
    classify_options = dict(threshold=params.threshold, batch_size=params.batch_size, nproc=params.nproc,
                            progress=progress, device=device, hot_pixels=hot)
    if comm is not None:
        if rank == 0:
            logger.info("MPI: %d ranks, each classifies a block of the %d images", comm.Get_size(), len(units))
        classification = classify_units_mpi(units, model, comm, **classify_options)
        if rank != 0:
            return
    else:
        classification = classify_units(units, model, **classify_options)

    t = time.perf_counter()
    agreement = expert_agreement(classification, expert) if expert else None
    write_csv(out(params.output.csv), classification, expert)
    hits = write_hits(out(params.output.experiments), experiments, classification)
    # the JSON records the time of the other outputs and of everything before (end to end)
    classification.seconds["output"] = time.perf_counter() - t
    classification.seconds["total"] = time.perf_counter() - started
    hot_summary = {"masked": int(sum(mask.sum() for mask in (hot or {}).values())),
                   "reports": reports} if params.hot_pixels.find else None
    write_json(out(params.output.json), classification, model_info, expert, agreement, hot_pixels=hot_summary)

    log_summary(classification, params.threshold)
    log_timing(classification)
    if agreement is not None:
        log_agreement(agreement)
    logger.info("Saved %s, %s and %d hit(s) to %s", out(params.output.json), out(params.output.csv), len(hits),
                out(params.output.experiments))


if __name__ == "__main__":
    run()
