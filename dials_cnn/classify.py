"""The classification engine: every image of an experiment list -> probabilities and a decision.

Each distinct image (file, index in file) is read once, flattened (:mod:`dials_cnn.projection`),
preprocessed with the model's own parameters and pushed through the network in batches. An image
that cannot be read or preprocessed becomes a record with its error and decision ``"error"``: every
input image is accounted for exactly once, in input order.
"""

import copy
import dataclasses
import logging
import mmap
import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import h5py
import numpy as np
import torch

from dials_cnn.decision import argmax_classes, hit_decisions, near_threshold_misses
from dials_cnn.hot_pixels import MIN_IMAGES, detector_key, find_hot_pixels, mask_hot_pixels, sampled_bright_pixels
from dials_cnn.memory import keep_freed_memory
from dials_cnn.model import CLASS_NAMES
from dials_cnn.preprocess import input_region, prepare
from dials_cnn.projection import projection_for, read_panels, static_mask

logger = logging.getLogger(__name__)

#: buffers one preadv call takes (1024 on Linux)
IOV_MAX = os.sysconf("SC_IOV_MAX")


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
    seconds: dict  # per stage: read, projection, preprocess, network (summed over workers: on the CPU
    # with nproc > 1 they run the network too), read_preprocess (wall time waiting for inputs), total

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
        scored = [r.probabilities for r in self.records if r.probabilities is not None]
        near = int(near_threshold_misses(np.reshape(scored, (-1, 3)), self.threshold).sum())
        return {
            "images": len(self.records),
            "classified": classified,
            "errors": decisions["error"],
            "class_counts": counts,
            "hits": decisions["Hit"],
            "misses": decisions["Miss"],
            "hit_rate": decisions["Hit"] / classified if classified else None,
            "threshold": self.threshold,
            # vetoed with P(HIT)+P(MAYBE) in (threshold - NEAR_THRESHOLD, threshold]
            "near_threshold_misses": near,
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


class DeviceError(ValueError):
    """A device that this machine does not have."""


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name="auto"):
    """``auto``: CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is a DeviceError."""
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device=cuda, but torch sees no CUDA GPU on this machine; use device=cpu or auto")
    return torch.device(name)


def inference_network(network, device=torch.device("cpu"), optimise=True):
    """A copy of ``network`` ready for inference on ``device``.

    ``optimise``: batch-norm folded into the preceding convolution (``torch.fx`` fuse) and
    channels-last memory layout; probabilities agree with the plain network to ~1e-6.
    """
    network = copy.deepcopy(network).eval()
    if optimise:
        try:
            from torch.fx.experimental.optimization import fuse

            network = fuse(network)
        except Exception as error:  # a network fx cannot trace still runs, unfused
            logger.debug("batch-norm fusion skipped: %s", error)
        network = network.to(memory_format=torch.channels_last)
    return network.to(device)


class _LayoutCutReader:
    """Reads just a region of an image of the project's own single-panel HDF5 layouts (CXIDB 76
    idh5, binned Rayonix), whose Format's raw data is the stored array as it is: a 1024^2 cut of a
    1920^2 image is a quarter of the bytes, and the file stays open between images."""

    def __init__(self, path, version):
        from dials_cnn import layouts

        self.layout = layouts.open_layout(path, version)
        self.dataset_name = layouts.PIXEL_DATASET[version]
        self.h5 = h5py.File(path, "r")
        self.fd = os.open(path, os.O_RDONLY)
        self.datasets = {}  # chunk name -> (dataset, whether its images can be read straight from the file)

    @classmethod
    def for_imageset(cls, imageset, path):
        """A reader if ``imageset``'s format is one of those layouts, else None (read via dxtbx)."""
        try:
            from dials_cnn.format.FormatHDF5CXIDB76 import FormatHDF5Layout

            format_class = imageset.get_format_class()
            if not (issubclass(format_class, FormatHDF5Layout)
                    and format_class.get_raw_data is FormatHDF5Layout.get_raw_data):
                return None
            return cls(path, format_class.layout_version)
        except Exception:  # anything unexpected: the general dxtbx path reads it
            return None

    def _dataset(self, chunk):
        if chunk not in self.datasets:
            dataset = self.h5["data"][chunk][self.dataset_name]
            if dataset.ndim != 3:
                raise ValueError("not a single-panel layout")
            # stored as plain bytes (no compression or other filter; contiguous, or one image per
            # chunk): rows can be read from the file at their offset, without HDF5's selection machinery
            plain = (dataset.id.get_create_plist().get_nfilters() == 0 and dataset.dtype.isnative
                     and (dataset.chunks is None or dataset.chunks == (1,) + dataset.shape[1:]))
            self.datasets[chunk] = (dataset, plain)
        return self.datasets[chunk]

    def _image_offset(self, dataset, within):
        """Byte offset of image ``within`` of ``dataset`` in the file, or None (not allocated)."""
        if dataset.chunks is None:
            offset = dataset.id.get_offset()
            return None if offset is None else offset + within * dataset.shape[1] * dataset.shape[2] * dataset.dtype.itemsize
        try:
            info = dataset.id.get_chunk_info_by_coord((within, 0, 0))
        except Exception:  # not written yet (live mode): HDF5's own read says what is there
            return None
        return None if info.byte_offset is None or info.filter_mask else info.byte_offset

    def read(self, file_index, y0, y1, x0, x1):
        chunk, within = self.layout.locate(file_index)
        dataset, plain = self._dataset(chunk)
        offset = self._image_offset(dataset, within) if plain else None
        if offset is not None:
            cut = self._mapped_cut(offset, dataset.shape[2], dataset.dtype, y0, y1, x0, x1)
            if cut is None:
                cut = self._read_plain(offset, dataset.shape[2], dataset.dtype, y0, y1, x0, x1)
            if cut is not None:
                return cut if cut.dtype == np.int32 else cut.astype(np.int32)
        return np.asarray(dataset[within, y0:y1, x0:x1], dtype=np.int32)

    def _mapped_cut(self, offset, width, dtype, y0, y1, x0, x1):
        """The cut of a plainly stored image at byte ``offset`` as a strided view of the file's pages mapped
        into memory: no copy, where reading copies every byte from the first to the last pixel of the cut
        (7 MB for a 1024^2 cut of a 1765^2 int32 CSPAD image; under load the largest cost of an image,
        measured with perf). The compiled flattening pass reads the view row by row; the pages are unmapped
        when the view goes, so a run's images do not pile up in memory. None if the file is shorter than
        the image (still being written) or cannot be mapped: the caller reads it.

        The file's size is checked at every read, so a file that shrank is read, not touched beyond its
        end (that would be a SIGBUS); live mode (:mod:`dials_cnn.live`) only reads files that stopped
        changing."""
        itemsize = np.dtype(dtype).itemsize
        start = offset + (y0 * width + x0) * itemsize
        end = offset + ((y1 - 1) * width + x1) * itemsize
        base = start - start % mmap.ALLOCATIONGRANULARITY
        try:
            if end > os.fstat(self.fd).st_size:
                return None
            mapped = mmap.mmap(self.fd, end - base, access=mmap.ACCESS_READ, offset=base)
            if hasattr(mmap, "MADV_WILLNEED"):
                # pages not in memory are read ahead in one go, not fault by fault: cold from disk, a
                # CSPAD cut took 17-18 ms per image without this, 8-12 ms with it (20-27 ms read by preadv)
                mapped.madvise(mmap.MADV_WILLNEED)
        except (OSError, ValueError):  # e.g. a file system that cannot map files
            return None
        # the view holds the map (numpy keeps no buffer export, so it must never be closed explicitly)
        return np.ndarray((y1 - y0, x1 - x0), dtype=dtype, buffer=mapped, offset=start - base,
                          strides=(width * itemsize, itemsize))

    def _read_plain(self, offset, width, dtype, y0, y1, x0, x1):
        """The cut of a plainly stored image at byte ``offset``: the file's bytes from its first to its
        last pixel in scattered reads (``preadv``), each row's part into the cut and the columns beside it
        into one small scratch row, so that only the cut is written to fresh memory (a 1024^2 cut of a
        1920^2 image: 1.4 ms, against 6.7 ms reading whole rows). None if the file is shorter."""
        itemsize = np.dtype(dtype).itemsize
        cut = np.empty((y1 - y0, x1 - x0), dtype=dtype)
        row_bytes, beside_bytes = (x1 - x0) * itemsize, (width - (x1 - x0)) * itemsize
        beside = memoryview(np.empty(width - (x1 - x0), dtype=dtype)).cast("B")
        whole = memoryview(cut).cast("B")
        buffers = [None] * (2 * (y1 - y0) - 1)  # row, beside, row, ...: nothing after the last row's part
        buffers[0::2] = [whole[k : k + row_bytes] for k in range(0, (y1 - y0) * row_bytes, row_bytes)]
        buffers[1::2] = [beside] * (y1 - y0 - 1)
        position = offset + (y0 * width + x0) * itemsize
        step = IOV_MAX - IOV_MAX % 2  # even: each part starts with a row
        for start in range(0, len(buffers), step):
            count = min(step, len(buffers) - start)
            wanted = (count + 1) // 2 * row_bytes + count // 2 * beside_bytes
            if os.preadv(self.fd, buffers[start : start + count], position) != wanted:
                return None
            position += wanted
        return cut

    def close(self):
        self.h5.close()
        os.close(self.fd)


class _SMVCutReader:
    """Reads just a region of an uncompressed 16-bit SMV image (ADSC, Rayonix and Hamamatsu SMV,
    Rigaku, nanoBragg's ``FormatSMVJHSim`` ...) straight from the file. dxtbx's ``FormatSMV`` reads
    the pixels through its file cache in thousands of small pieces: 50-70 ms for a 1700^2 image, against
    ~1 ms for the rows a 1024^2 cut needs. Only formats whose ``get_raw_data`` is the stock one (the
    stored array as it is) and files of exactly header + pixels (not gzipped) are read this way."""

    def __init__(self, path, header_bytes, width, height, dtype):
        self.path, self.header_bytes, self.width, self.height, self.dtype = path, header_bytes, width, height, dtype

    @classmethod
    def for_imageset(cls, imageset, path, position):
        """A reader if ``imageset``'s format reads plain SMV files, else None (read via dxtbx)."""
        try:
            from dxtbx.format.FormatSMV import FormatSMV
            from dxtbx.format.FormatSMVADSC import FormatSMVADSC
            from dxtbx.format.FormatSMVJHSim import FormatSMVJHSim
            from dxtbx.format.FormatSMVRigaku import FormatSMVRigaku

            format_class = imageset.get_format_class()
            stock = (FormatSMVADSC.get_raw_data, FormatSMVJHSim.get_raw_data, FormatSMVRigaku.get_raw_data)
            detector = imageset.get_detector(position)
            if not issubclass(format_class, FormatSMV) or format_class.get_raw_data not in stock or len(detector) != 1:
                return None
            header_bytes, header = FormatSMV.get_smv_header(path)
            width, height = detector[0].get_image_size()  # what the stock reader reads, in this order
            if header["BYTE_ORDER"] not in ("little_endian", "big_endian") or \
                    os.path.getsize(path) != header_bytes + 2 * width * height:
                return None
            dtype = np.dtype("<u2" if header["BYTE_ORDER"] == "little_endian" else ">u2")
            return cls(path, header_bytes, width, height, dtype)
        except Exception:  # anything unexpected: the general dxtbx path reads it (and names the error)
            return None

    def read(self, file_index, y0, y1, x0, x1):
        rows = np.fromfile(self.path, dtype=self.dtype, count=(y1 - y0) * self.width,
                           offset=self.header_bytes + 2 * y0 * self.width)
        if rows.size != (y1 - y0) * self.width:
            return None  # shorter than when it was looked at: dxtbx says what is wrong with it
        return rows.reshape(y1 - y0, self.width)[:, x0:x1].astype(np.int32)

    def close(self):
        pass


#: files whose masks and readers a process keeps: images come file by file, and a run of
#: single-image files (CBF, SMV, pickles) would otherwise keep one static mask per image
CACHED_FILES = 8


def _cached(cache, key, make, on_evict=None):
    """``cache[key]``, made by ``make()`` if absent; the oldest entry of the same kind goes beyond
    :data:`CACHED_FILES` (``on_evict`` is called with it)."""
    if key not in cache:
        same_kind = [k for k in cache if isinstance(k, tuple) and k[0] == key[0]]
        for old in same_kind[: max(0, len(same_kind) + 1 - CACHED_FILES)]:
            value = cache.pop(old)
            if on_evict is not None and value is not None:
                on_evict(value)
        cache[key] = make()
    return cache[key]


def _cut_reader(unit, cache):
    def make():
        return (_LayoutCutReader.for_imageset(unit.imageset, unit.path)
                or _SMVCutReader.for_imageset(unit.imageset, unit.path, unit.position))

    return _cached(cache, ("reader", unit.path), make, on_evict=lambda reader: reader.close())


def close_readers(cache):
    for key, reader in list(cache.items()):
        if isinstance(key, tuple) and key[0] == "reader" and reader is not None:
            reader.close()
            del cache[key]


def read_flat(unit, params, masks, margin=0, crop_only=True, seconds=None):
    """The flat image of one unit as the classification sees it, where it lies on the flat grid
    (y0, y1, x0, x1), and the grid's shape.

    ``masks``: this process's cache (static masks, open files). ``crop_only``: read and flatten only
    the square the preprocessing uses (identical pixels, less work). ``seconds`` (a dict) accumulates
    the time spent reading and flattening.
    """
    t0 = time.perf_counter()
    # The static mask is the file's (the format's, or a mask file applied to the imageset): one per
    # file and mask file, not per still's imageset (converting it costs 0.4 ms an image on a CSPAD)
    key = ("mask", unit.path, unit.imageset.external_lookup.mask.filename)
    mask = _cached(masks, key, lambda: static_mask(unit.imageset))
    detector = unit.imageset.get_detector(unit.position)
    beam = unit.imageset.get_beam(unit.position)
    projection = projection_for(detector, beam)
    region = input_region(params, projection.beam_centre_px, margin) if crop_only else None
    reader = _cut_reader(unit, masks) if region is not None and projection.source_index is None else None
    cut = None
    if reader is not None:
        y0, y1, x0, x1 = projection.clip_region(region)
        cut = reader.read(unit.file_index, y0, y1, x0, x1)
    if cut is not None:
        t1 = time.perf_counter()
        flat = projection.flatten_cut(cut, mask, region)
    else:
        panels = read_panels(unit.imageset, unit.position)
        t1 = time.perf_counter()
        flat = projection.flatten(panels, mask, region)
    place = projection.clip_region(region) if region is not None else (0, projection.shape[0], 0, projection.shape[1])
    if seconds is not None:
        for stage, value in (("read", t1 - t0), ("projection", time.perf_counter() - t1)):
            seconds[stage] = seconds.get(stage, 0.0) + value
    return flat, place, projection.shape


def _read_and_prepare(unit, params, masks, margin=0, seconds=None, crop_only=True, hot=None):
    """The network input of one unit, or the error message why there is none.

    ``masks``, ``crop_only``, ``seconds``: see :func:`read_flat` (``seconds`` also gets the time spent
    preprocessing). ``hot``: hot pixels to mask as well (:func:`find_run_hot_pixels`).
    """
    seconds = {} if seconds is None else seconds
    try:
        flat, place, _ = read_flat(unit, params, masks, margin, crop_only, seconds)
        if hot:
            mask_hot_pixels(flat, hot.get(detector_key(unit.imageset.get_detector(unit.position))), place)
        t2 = time.perf_counter()
        array = prepare(flat, params, margin=margin)
        seconds["preprocess"] = seconds.get("preprocess", 0.0) + time.perf_counter() - t2
        return array, None
    except Exception as error:  # any unreadable image is reported, never fatal
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return None, f"{type(error).__name__}: {message}"


def find_run_hot_pixels(units, params, sample=20, min_fraction=0.5, crop_only=True, nproc=1):
    """:func:`dials_cnn.hot_pixels.find_hot_pixels` on the part of each image that preprocessing
    ``params`` uses, read the way the classification reads it; ``nproc`` > 1: the sampled images are
    looked at by that many forked processes."""
    cache = {}

    def read(unit):
        return read_flat(unit, params, cache, crop_only=crop_only)

    def look_in_workers(sampled):
        _WORKER.update(sampled=sampled, params=params, crop_only=crop_only)
        try:  # an image whose worker died is one that could not be looked at
            return [_unpacked(r) for r in in_workers(_worker_bright_pixels, len(sampled), nproc, 1, lambda k: None)]
        finally:
            _WORKER.clear()

    try:
        return find_hot_pixels(units, read, sample, min_fraction=min_fraction,
                               look=look_in_workers if nproc > 1 else None)
    finally:
        close_readers(cache)


def _worker_bright_pixels(position):
    cache = _WORKER.setdefault("masks", {})
    result = sampled_bright_pixels(_WORKER["sampled"][position],
                                   lambda unit: read_flat(unit, _WORKER["params"], cache, crop_only=_WORKER["crop_only"]))
    if result is None:
        return None
    bright, place, shape = result
    return np.packbits(bright), bright.shape, place, shape  # 8x fewer bytes back to the parent


def _unpacked(result):
    if result is None:
        return None
    packed, cut_shape, place, shape = result
    return np.unpackbits(packed, count=int(np.prod(cut_shape))).reshape(cut_shape).astype(bool), place, shape


class RunningHotPixelSearch:
    """Hot pixels of a run that arrives a few images at a time (live mode with one image per file, the
    ``dials.cnn_stills_process`` veto, which sees one still at a time): the images of each detector are
    kept until there are :data:`~dials_cnn.hot_pixels.MIN_IMAGES` of them, then searched once
    (:func:`find_run_hot_pixels`). Until then that detector's images are classified unmasked: a hot
    pixel can only make a blank look like a hit, so nothing is vetoed for it."""

    def __init__(self, params, sample=20, min_fraction=0.5):
        self.params, self.sample, self.min_fraction = params, sample, min_fraction
        self.hot_pixels = {}  # detector key -> bool mask over the flat grid, or None: looked at, unusable
        self.reports = []
        self._waiting = {}  # detector key -> units not yet searched

    def update(self, units):
        """Take ``units`` into account; returns {detector key: hot-pixel mask} as known now."""
        for unit in units:
            key = detector_key(unit.imageset.get_detector(unit.position))
            if key not in self.hot_pixels:
                self._waiting.setdefault(key, []).append(unit)
        for key, waiting in list(self._waiting.items()):
            if len(waiting) >= MIN_IMAGES:
                found, reports = find_run_hot_pixels(waiting, self.params, self.sample, self.min_fraction)
                self.hot_pixels.update(found)
                self.hot_pixels.setdefault(key, None)
                for line in reports:
                    logger.info(line)
                self.reports.extend(reports)
                del self._waiting[key]
        return self.hot_pixels


# Worker state for nproc > 1 (fork: the units list is inherited, never pickled).
_WORKER = {}


def _worker_start():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (live mode)
    torch.set_num_threads(1)
    keep_freed_memory()


def in_workers(function, n, nproc, chunksize, lost):
    """Yield ``function(k)`` for k = 0 .. n - 1, in order, computed by ``nproc`` forked processes.

    A worker that dies (a crash in a reader's compiled code, the kernel's out-of-memory killer) must not
    hang the run or lose its images: the pool is started again from the first result not yet given, and
    that image is first tried alone in a process of its own; if that one dies too, ``lost(k)`` stands in
    for its result. Closing the generator (Ctrl-C in live mode) cancels what has not started.
    """
    context = multiprocessing.get_context("fork")
    done = 0
    while done < n:
        pool = ProcessPoolExecutor(min(nproc, n - done), mp_context=context, initializer=_worker_start)
        try:
            for result in pool.map(function, range(done, n), chunksize=chunksize):
                yield result
                done += 1
        except BrokenProcessPool:
            logger.warning("A worker process died; image %d of %d is tried again on its own", done + 1, n)
            alone = ProcessPoolExecutor(1, mp_context=context, initializer=_worker_start)
            try:
                result = alone.submit(function, done).result()
            except BrokenProcessPool:
                result = lost(done)
            finally:
                alone.shutdown(wait=False, cancel_futures=True)
            yield result
            done += 1
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _worker_prepare(position):
    seconds = {}
    array, error = _read_and_prepare(_WORKER["units"][position], _WORKER["params"], _WORKER["masks"],
                                     _WORKER["margin"], seconds, _WORKER["crop_only"], _WORKER["hot"])
    if _WORKER["network"] is not None and array is not None:
        t = time.perf_counter()
        array = cpu_probabilities(_WORKER["network"], array, _WORKER["memory_format"])
        seconds["network"] = time.perf_counter() - t
    return position, array, error, seconds


def _died_on(position):
    return (position, None, "the worker process reading this image died (a crash in its reader, or out of "
                            "memory); nproc=1 shows the reader's own error", {})


def cpu_probabilities(network, array, memory_format=torch.channels_last):
    """P(HIT), P(MAYBE), P(MISS) (float64) of one preprocessed input on the CPU, in a batch of one
    (see :func:`classify_units`: the batch size is constant, so the numbers do not depend on where
    the image was scored)."""
    with torch.inference_mode():
        x = torch.from_numpy(array)[None, None].contiguous(memory_format=memory_format)
        return network(x).exp()[0].numpy().astype(np.float64)


def prepared_inputs(units, params, nproc=1, margin=0, crop_only=True, with_seconds=False, hot=None,
                    network=None, memory_format=torch.channels_last):
    """Yield (position, input array or None, error or None) for ``units``, in input order.

    ``nproc`` > 1: worker processes read and preprocess ahead while the caller runs the network.
    ``with_seconds``: each item also carries the {stage: seconds} spent on it. ``hot``: hot pixels
    to mask (:func:`find_run_hot_pixels`). ``network`` (a CPU network, with ``nproc`` > 1): the workers
    also score each input (:func:`cpu_probabilities`) and yield its probabilities instead of the
    array, so that no input travels between processes (1 MB per image) and every core runs the whole
    pipeline.
    """
    if nproc <= 1 or len(units) < 2:
        cache = {}
        try:
            for position, unit in enumerate(units):
                seconds = {}
                array, error = _read_and_prepare(unit, params, cache, margin, seconds, crop_only, hot)
                yield (position, array, error, seconds) if with_seconds else (position, array, error)
        finally:
            close_readers(cache)  # a file may be rewritten later (live mode): never keep it open
        return
    _WORKER.update(units=units, params=params, masks={}, margin=margin, crop_only=crop_only, hot=hot,
                   network=network, memory_format=memory_format)
    try:
        for item in in_workers(_worker_prepare, len(units), nproc, 4, _died_on):
            yield item if with_seconds else item[:3]
    finally:
        _WORKER.clear()


def classify_units(units, model, threshold=0.5, batch_size=16, nproc=1, progress=None, device="cpu",
                   optimise=True, network=None, hot_pixels=None, network_in_workers=True):
    """Classify ``units`` (from :func:`image_units`) with a :class:`~dials_cnn.model.ScreeningModel`.

    ``optimise=False`` is the straightforward path (whole flat image, plain network), kept to check
    that the fast path gives the same predictions. ``network``: the model's network already made by
    :func:`inference_network` for ``device`` (callers classifying many small batches reuse it).
    ``hot_pixels``: pixels to mask as well (:func:`find_run_hot_pixels`). ``network_in_workers=False``
    keeps the network in this process even on the CPU with ``nproc`` > 1 (for hooks on it).
    """
    keep_freed_memory()
    device = resolve_device(device) if isinstance(device, str) else device
    if network is None:
        network = inference_network(model.network, device, optimise)
    memory_format = torch.channels_last if optimise else torch.contiguous_format
    params = model.preprocess
    records = [None] * len(units)
    seconds = {"read": 0.0, "projection": 0.0, "preprocess": 0.0, "read_preprocess": 0.0, "network": 0.0}
    started = time.perf_counter()
    batch, batch_positions = [], []

    def record(positions, probabilities):
        hits = hit_decisions(probabilities, threshold)
        classes = argmax_classes(probabilities)
        for k, position in enumerate(positions):
            unit = units[position]
            records[position] = ImageRecord(
                unit.path, unit.file_index, tuple(float(v) for v in probabilities[k]), str(classes[k]),
                "Hit" if hits[k] else "Miss", None,
            )

    def flush():
        if not batch:
            return
        t = time.perf_counter()
        # The convolution kernels chosen depend on the batch size (last-digit differences), so every
        # image goes through the network in a batch of constant size: its probabilities do not depend
        # on how the images were split (nproc, MPI ranks, live chunks). On the CPU that size is 1
        # (measured faster per image than 16: the activations stay in cache); on a GPU, batch_size,
        # a partial batch padded with zeros.
        if device.type == "cpu":
            probabilities = np.stack([cpu_probabilities(network, array, memory_format) for array in batch])
        else:
            with torch.inference_mode():
                stacked = np.stack(batch + [np.zeros_like(batch[0])] * (batch_size - len(batch)))
                output = network(torch.from_numpy(stacked)[:, None].to(device, memory_format=memory_format))
                probabilities = output.exp().cpu().numpy().astype(np.float64)[: len(batch)]
        seconds["network"] += time.perf_counter() - t
        record(batch_positions, probabilities)
        batch.clear()
        batch_positions.clear()

    # On the CPU with worker processes, the workers run the network too (prepared_inputs).
    in_workers = network_in_workers and device.type == "cpu" and nproc > 1 and len(units) >= 2
    t = time.perf_counter()
    inputs = prepared_inputs(units, params, nproc, crop_only=optimise, with_seconds=True, hot=hot_pixels,
                             network=network if in_workers else None, memory_format=memory_format)
    for done, (position, array, error, stage_seconds) in enumerate(inputs, start=1):
        for stage, value in stage_seconds.items():
            seconds[stage] += value
        if error is not None:
            unit = units[position]
            records[position] = ImageRecord(unit.path, unit.file_index, error=error)
        elif in_workers:
            record([position], array[None])
        else:
            batch.append(array)
            batch_positions.append(position)
        if len(batch) >= batch_size:
            seconds["read_preprocess"] += time.perf_counter() - t
            flush()
            t = time.perf_counter()
        if progress is not None:
            progress(done, len(units))
    seconds["read_preprocess"] += time.perf_counter() - t
    flush()
    seconds["total"] = time.perf_counter() - started
    return Classification(records, units, threshold, seconds)


def classify_experiments(experiments, model, threshold=0.5, batch_size=16, nproc=1, progress=None, device="cpu",
                         optimise=True):
    """Classify every image of an ExperimentList."""
    return classify_units(image_units(experiments), model, threshold, batch_size, nproc, progress, device, optimise)


def rank_block(n_units, rank, size):
    """(start, stop) of the contiguous share of ``n_units`` that MPI rank ``rank`` of ``size`` takes."""
    return n_units * rank // size, n_units * (rank + 1) // size


def classify_units_mpi(units, model, comm, threshold=0.5, batch_size=16, nproc=1, progress=None, device="cpu",
                       optimise=True, hot_pixels=None):
    """:func:`classify_units` across the ranks of an MPI communicator (cctbx.xfel style).

    Every rank classifies a contiguous block of ``units`` (consecutive images of a file stay on one
    rank); rank 0 gathers the records in input order and returns the same Classification a single
    process would (stage seconds summed over ranks, total = the slowest rank). Other ranks return None.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    start, stop = rank_block(len(units), rank, size)
    started = time.perf_counter()
    part = classify_units(units[start:stop], model, threshold, batch_size, nproc, progress, device, optimise,
                          hot_pixels=hot_pixels)
    part.seconds["total"] = time.perf_counter() - started
    gathered = comm.gather((part.records, part.seconds), root=0)
    if rank != 0:
        return None
    records, seconds = [], {}
    for rank_records, rank_seconds in gathered:
        records.extend(rank_records)
        for stage, value in rank_seconds.items():
            seconds[stage] = max(seconds.get(stage, 0.0), value) if stage == "total" else seconds.get(stage, 0.0) + value
    return Classification(records, units, threshold, seconds)


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
