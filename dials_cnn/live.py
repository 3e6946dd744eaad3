"""Live screening: classify image files as they appear in a folder (``dials.cnn_classify watch=DIR``).

A file is classified once dxtbx can open and understand it and its image count has stopped growing
(the same count, size and modification time on two polls in a row): a file still being written is
either unreadable (an HDF5 file held open by its writer, a truncated file) or still growing, and is
simply looked at again on the next poll. Images appended to a file later are classified then; no
image is classified twice.

Rows are appended to the CSV (flushed and synced per batch), so a reader or a crash never loses
classified images; the hit rate is logged every ``report_seconds``. The first Ctrl-C (SIGINT) stops
after the batch in progress, then the JSON summary and ``hits.expt`` of everything classified are
written.
"""

import csv
import fnmatch
import logging
import os
import signal
import threading
import time

from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

from dials_cnn.classify import (
    Classification, RunningHotPixelSearch, classify_units, image_units, inference_network, resolve_device,
)
from dials_cnn.output import CSV_COLUMNS, format_csv_row, record_rows

logger = logging.getLogger("dials.cnn_classify.live")  # under "dials": shown by dials.util.log


class _FileState:
    def __init__(self):
        self.signature = None  # (image count, size, mtime) seen on the last poll
        self.done = set()  # file indices classified
        self.experiments = None


class LiveClassifier:
    """Watch ``directory`` for files matching ``patterns`` and classify their images as they arrive.

    ``csv_path`` gets one row per image (the columns of :mod:`dials_cnn.output`), appended as images
    are classified. :meth:`run` returns the :class:`~dials_cnn.classify.Classification` of every image
    and the ExperimentList they came from.
    """

    def __init__(self, directory, model, csv_path, threshold=0.5, batch_size=16, nproc=1, device="cpu",
                 patterns=("*.h5", "*.nxs", "*.cbf", "*.img"), poll_seconds=1.0, idle_timeout=None,
                 report_seconds=60.0, chunk_images=64, find_hot_pixels=True, hot_pixel_sample=20,
                 hot_pixel_min_fraction=0.5):
        self.directory = os.path.abspath(os.fspath(directory))
        self.model = model
        self.csv_path = os.fspath(csv_path)
        self.threshold = threshold
        self.batch_size = batch_size
        self.nproc = nproc
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.patterns = tuple(patterns)
        self.poll_seconds = poll_seconds
        self.idle_timeout = idle_timeout
        self.report_seconds = report_seconds
        self.chunk_images = max(chunk_images, batch_size)
        self.files = {}
        self.units, self.records = [], []
        self.intervals = []  # per report interval: start, seconds, images, hits
        self.stop_requested = threading.Event()
        self._network = None
        # hot pixels per detector, looked for once enough images of that detector have arrived
        self.hot_pixel_search = (RunningHotPixelSearch(model.preprocess, hot_pixel_sample, hot_pixel_min_fraction)
                                 if find_hot_pixels else None)

    # -- what is there -------------------------------------------------------------------------
    def candidates(self):
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        return [os.path.join(self.directory, name) for name in names
                if not name.startswith(".") and any(fnmatch.fnmatch(name, p) for p in self.patterns)]

    def ready_units(self, path):
        """The not yet classified images of ``path`` if the file is complete for now, else []."""
        state = self.files.setdefault(path, _FileState())
        try:
            stat = os.stat(path)
            experiments = ExperimentListFactory.from_filenames([path])
            units = image_units(experiments)
        except Exception as error:  # still being written (locked, truncated) or not an image file
            logger.debug("%s not readable yet: %s", path, str(error).strip().splitlines()[:1])
            state.signature = None
            return []
        signature = (len(units), stat.st_size, stat.st_mtime_ns)
        stable = signature == state.signature
        state.signature = signature
        if not stable:
            return []
        state.experiments = experiments
        return [u for u in units if u.file_index not in state.done]

    # -- classification and output -----------------------------------------------------------------
    def _classify(self, path, units, csv_handle):
        hot_pixels = self.hot_pixel_search.update(units) if self.hot_pixel_search else None
        classification = classify_units(units, self.model, self.threshold, self.batch_size, self.nproc,
                                        device=self.device, network=self._network, hot_pixels=hot_pixels)
        writer = csv.DictWriter(csv_handle, fieldnames=CSV_COLUMNS)
        for row in record_rows(classification.records):
            writer.writerow(format_csv_row(row))
        csv_handle.flush()
        os.fsync(csv_handle.fileno())
        self.files[path].done.update(unit.file_index for unit in units)
        self.units.extend(units)
        self.records.extend(classification.records)
        return classification

    def _report(self, interval):
        classified = interval["images"] - interval["errors"]
        total_classified = sum(r.decision != "error" for r in self.records)
        total_hits = sum(r.decision == "Hit" for r in self.records)
        so_far = "so far %d images, hit rate %s" % (
            len(self.records), "%.1f %%" % (100.0 * total_hits / total_classified) if total_classified else "-")
        if not interval["images"]:
            logger.info("%s: no new images in the last %.0f s; %s", time.strftime("%H:%M:%S"), interval["seconds"],
                        so_far)
            return
        logger.info(
            "%s: %d images in the last %.0f s (%.1f images/s), hit rate %s (%d hits); %s",
            time.strftime("%H:%M:%S"), interval["images"], interval["seconds"],
            interval["images"] / interval["seconds"], "%.1f %%" % (100.0 * interval["hits"] / classified)
            if classified else "-", interval["hits"], so_far,
        )

    def run(self):
        """Watch until SIGINT, :attr:`stop_requested` or ``idle_timeout`` seconds without new images."""
        self._network = inference_network(self.model.network, self.device)
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum, frame):
                if self.stop_requested.is_set():
                    raise KeyboardInterrupt
                logger.info("Ctrl-C: stopping after the images in progress (Ctrl-C again to abort)")
                self.stop_requested.set()

            previous_handler = signal.signal(signal.SIGINT, on_sigint)
        logger.info("Watching %s for %s (Ctrl-C to stop)", self.directory, " ".join(self.patterns))
        last_activity = interval_start = time.time()
        interval = {"images": 0, "hits": 0, "errors": 0}
        try:
            with open(self.csv_path, "w", newline="") as handle:
                csv.DictWriter(handle, fieldnames=CSV_COLUMNS).writeheader()
                handle.flush()
                while not self.stop_requested.is_set():
                    for path in self.candidates():
                        units = self.ready_units(path)
                        for start in range(0, len(units), self.chunk_images):
                            if self.stop_requested.is_set():
                                break
                            done = self._classify(path, units[start : start + self.chunk_images], handle)
                            summary = done.summary()
                            interval["images"] += summary["images"]
                            interval["hits"] += summary["hits"]
                            interval["errors"] += summary["errors"]
                            last_activity = time.time()
                        if self.stop_requested.is_set():
                            break
                    now = time.time()
                    if now - interval_start >= self.report_seconds:
                        interval["start"], interval["seconds"] = interval_start, now - interval_start
                        self.intervals.append(dict(interval))
                        self._report(self.intervals[-1])
                        interval, interval_start = {"images": 0, "hits": 0, "errors": 0}, now
                    if self.idle_timeout is not None and now - last_activity > self.idle_timeout:
                        logger.info("No new images for %.0f s: stopping", self.idle_timeout)
                        break
                    self.stop_requested.wait(self.poll_seconds)
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        if interval["images"]:
            now = time.time()
            interval["start"], interval["seconds"] = interval_start, now - interval_start
            self.intervals.append(dict(interval))
            self._report(self.intervals[-1])
        return self.classification(), self.experiments()

    def classification(self):
        """Every record so far, with units of each file's latest ExperimentList (a file that grew
        was re-read: its earlier images belong to the latest imageset, as hits.expt needs)."""
        latest = {}
        for state in self.files.values():
            if not state.done:
                continue
            for unit in image_units(state.experiments):
                latest[(unit.path, unit.file_index)] = unit
        units = [latest.get((u.path, u.file_index), u) for u in self.units]
        seconds = {"total": sum(i["seconds"] for i in self.intervals)}
        return Classification(list(self.records), units, self.threshold, seconds)

    def experiments(self):
        experiments = ExperimentList()
        for state in self.files.values():
            if state.done:
                experiments.extend(state.experiments)
        return experiments
