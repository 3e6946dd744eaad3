"""The CNN as a pre-filter in front of ``dials.stills_process``: vetoed images never reach spot finding.

``dials.stills_process`` hands every image to ``Processor.process_experiments(tag, experiments)``,
which runs spot finding, indexing, refinement and integration. :class:`VetoProcessor` classifies the
image first and returns straight away for a Miss, so nothing downstream runs. The model is loaded
once per process (per MPI rank or multiprocessing worker) when the first image arrives.

Each veto is logged (and written to the stills_process debug log as ``cnn_veto``); every decision,
kept or vetoed, goes to ``cnn_veto_<rank>.csv`` in the output directory, and each process logs how
many images it vetoed, the time the CNN took and the time spent on the kept images.

``Script.run`` creates its processors from the module-level name ``Processor`` of
``dials.command_line.stills_process`` (inside closures it defines), so :class:`VetoScript` swaps that
name for :class:`VetoProcessor` while it runs; everything else, MPI included, is stills_process's own.
"""

import contextlib
import csv
import logging
import os
import time

from libtbx.phil import parse

from dials_cnn.annotations import image_key
from dials_cnn.default_model import shipped_model_path
from dials_cnn.fileio import atomic_write

logger = logging.getLogger("dials.cnn_stills_process")

cnn_veto_phil_str = """
cnn_veto {
  enable = True
    .type = bool
    .help = "Classify each image with the CNN before spot finding; images classified Miss are skipped."
  model = None
    .type = path
    .help = "Model file written by dials.cnn_train, or a shipped model: default (None) or fast."
  threshold = 0.5
    .type = float(value_min=0, value_max=1)
    .help = "Keep an image if P(HIT) + P(MAYBE) > threshold; lower keeps more (fewer lost hits)."
  nthreads = 1
    .type = int(value_min=1)
    .help = "Torch threads per process for the network."
  hot_pixels = True
    .type = bool
    .help = "Mask hot pixels found on each process's first images (10 per detector); the images before"
            "that are classified unmasked (a hot pixel can only make a blank look like a hit)."
  decisions_filename = cnn_veto_%s.csv
    .type = str
    .help = "Per-process table of every decision, in output.output_dir (%s: the process's rank)."
}
"""

CSV_COLUMNS = ("tag", "file", "index", "key", "p_hit", "p_maybe", "p_miss", "decision", "error", "cnn_seconds")


def veto_phil_scope():
    """``dials.stills_process``' phil (with its program defaults) plus the ``cnn_veto`` scope."""
    from dials.command_line import stills_process

    return parse(
        stills_process.control_phil_str + stills_process.dials_phil_str + cnn_veto_phil_str, process_includes=True
    ).fetch(parse(stills_process.program_defaults_phil_str))


class CNNVeto:
    """Loads the model on first use and classifies one experiment list (one still) at a time."""

    def __init__(self, model_path=None, threshold=0.5, nthreads=1, hot_pixels=True):
        self.model_path = shipped_model_path(model_path)
        self.threshold = threshold
        self.nthreads = nthreads
        self.find_hot_pixels = hot_pixels
        self._model = None
        self._hot_pixel_search = None

    @property
    def model(self):
        if self._model is None:
            import torch

            from dials_cnn.model import load_model

            torch.set_num_threads(self.nthreads)
            self._model = load_model(self.model_path)
            logger.info("CNN veto: loaded %s (%s), keep if P(HIT)+P(MAYBE) > %g", self.model_path,
                        self._model.architecture, self.threshold)
        return self._model

    def classify(self, experiments):
        """The :class:`dials_cnn.classify.ImageRecord` of each image of ``experiments``."""
        from dials_cnn.classify import RunningHotPixelSearch, classify_units, image_units

        units = image_units(experiments)
        hot = None
        if self.find_hot_pixels:
            if self._hot_pixel_search is None:
                self._hot_pixel_search = RunningHotPixelSearch(self.model.preprocess)
            hot = self._hot_pixel_search.update(units)
        return classify_units(units, self.model, threshold=self.threshold, hot_pixels=hot).records

    @property
    def hot_pixels(self):
        """{detector key: hot-pixel mask} found so far (empty before the first 10 images)."""
        return self._hot_pixel_search.hot_pixels if self._hot_pixel_search else {}


def _processor_base():
    from dials.command_line.stills_process import Processor

    return Processor


class VetoProcessor(_processor_base()):
    """A stills_process Processor that skips images the CNN classifies Miss."""

    def __init__(self, params, composite_tag=None, rank=0):
        super().__init__(params, composite_tag=composite_tag, rank=rank)
        self.rank = rank
        veto = params.cnn_veto
        self.veto = CNNVeto(veto.model, veto.threshold, veto.nthreads, veto.hot_pixels) if veto.enable else None
        self.decisions = []
        self.seconds = {"cnn": 0.0, "kept": 0.0}

    def process_experiments(self, tag, experiments):
        if self.veto is None:
            return super().process_experiments(tag, experiments)
        started = time.time()
        records = self.veto.classify(experiments)
        cnn_seconds = time.time() - started
        self.seconds["cnn"] += cnn_seconds
        # an unreadable image is left to stills_process, which reports it in its own way
        keep = any(r.decision != "Miss" for r in records)
        for record in records:
            self.decisions.append((tag, record, cnn_seconds / max(len(records), 1)))
        if not keep:
            p = records[0].probabilities
            logger.info("CNN veto %s (%s): P(HIT)+P(MAYBE) = %.3f <= %g, skipped", tag,
                        image_key(records[0].path, records[0].file_index), p[0] + p[1], self.veto.threshold)
            self.debug_start(tag)
            self.debug_write("cnn_veto_%.3f" % (p[0] + p[1]), "stop")
            return
        started = time.time()
        try:
            return super().process_experiments(tag, experiments)
        finally:
            self.seconds["kept"] += time.time() - started

    def summary(self):
        vetoed = sum(1 for _, r, _ in self.decisions if r.decision == "Miss")
        kept_images = len(self.decisions) - vetoed
        per_kept = self.seconds["kept"] / kept_images if kept_images else 0.0
        return {"images": len(self.decisions), "vetoed": vetoed, "kept": kept_images,
                "cnn_seconds": self.seconds["cnn"], "kept_seconds": self.seconds["kept"],
                "seconds_per_kept_image": per_kept}

    def write_decisions(self):
        if self.veto is None or not self.decisions:
            return None
        name = self.params.cnn_veto.decisions_filename
        if "%s" in name:
            name = name % ("%04d" % self.rank)
        path = os.path.join(self.params.output.output_dir, name)
        with atomic_write(path, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for tag, record, seconds in self.decisions:
                p = record.probabilities or ("", "", "")
                writer.writerow({
                    "tag": tag, "file": record.path, "index": record.file_index,
                    "key": image_key(record.path, record.file_index),
                    "p_hit": p[0], "p_maybe": p[1], "p_miss": p[2], "decision": record.decision,
                    "error": record.error or "", "cnn_seconds": "%.4f" % seconds,
                })
        return path

    def finalize(self):
        if self.veto is not None and self.decisions:
            s = self.summary()
            logger.info(
                "CNN veto (process %d): %d of %d images vetoed, %d kept; CNN %.2f s (%.1f ms/image); kept images "
                "%.2f s in stills_process (%.2f s each)", self.rank, s["vetoed"], s["images"], s["kept"],
                s["cnn_seconds"], 1000 * s["cnn_seconds"] / s["images"], s["kept_seconds"], s["seconds_per_kept_image"],
            )
            path = self.write_decisions()
            logger.info("CNN veto decisions written to %s", path)
        return super().finalize()


@contextlib.contextmanager
def processors_with_veto():
    """Make ``dials.stills_process`` create :class:`VetoProcessor` objects while the block runs."""
    from dials.command_line import stills_process

    original = stills_process.Processor
    stills_process.Processor = VetoProcessor
    try:
        yield
    finally:
        stills_process.Processor = original


def _script_base():
    from dials.command_line.stills_process import Script

    return Script


class VetoScript(_script_base()):
    """``dials.stills_process``' Script with the ``cnn_veto`` scope and the veto processor."""

    usage = "dials.cnn_stills_process [options] [param.phil] filenames [cnn_veto.model=model.pt]"

    def __init__(self, help_message=None):
        super().__init__()
        from dials.util.options import ArgumentParser

        self.parser = ArgumentParser(usage=self.usage, phil=veto_phil_scope(), epilog=help_message)

    def run(self, args=None):
        with processors_with_veto():
            return super().run(args)
