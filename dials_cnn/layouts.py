"""HDF5 layouts for serial-crystallography stills: streaming writers and a shared, checked reader.

Three layouts (documented dataset by dataset in docs/file_layouts.md):

* ``idh5``            -- the paper's CXIDB id-76 layout ``idh5_v1.0`` (one assembled image per shot);
* ``raw_cspad``       -- ``dials_cnn_raw_cspad_v1``: the 64 CSPAD ASICs per shot plus their placements;
* ``rayonix_binned``  -- ``dials_cnn_binned_rayonix_v1``: hardware-binned Rayonix images, binning and
  central hole recorded.

All share ``data/<chunk>/`` groups holding per-shot ``distance`` (mm), ``wavelength`` (Angstrom) and
``timestamp`` next to the pixel stack; image indices run over the chunks in sorted name order.
Writers stream one image at a time into a temporary file that replaces the target only when the
``with`` block ends without error, so a reader never meets a half-written file.
"""

import contextlib
import functools
import os

import h5py
import numpy as np
from libtbx.utils import Sorry

from dials_cnn import cspad
from dials_cnn.fileio import atomic_path

IDH5_VERSION = "idh5_v1.0"
RAW_CSPAD_VERSION = "dials_cnn_raw_cspad_v1"
BINNED_RAYONIX_VERSION = "dials_cnn_binned_rayonix_v1"

#: Dataset holding the version string of each layout (idh5 names it; ours use a neutral name).
VERSION_KEYS = {
    IDH5_VERSION: "metadata/idh5_version",
    RAW_CSPAD_VERSION: "metadata/layout_version",
    BINNED_RAYONIX_VERSION: "metadata/layout_version",
}

IDH5_METADATA = (
    "BEAM_CENTER_X",
    "BEAM_CENTER_Y",
    "PIXEL_SIZE",
    "SIZE1",
    "SIZE2",
    "MIN_TRUSTED_VALUE",
    "SATURATED_VALUE",
    "ACTIVE_AREAS",
)
RAW_CSPAD_METADATA = (
    "DETECTOR",
    "BEAM_CENTER_X",
    "BEAM_CENTER_Y",
    "PIXEL_SIZE",
    "ASIC_SHAPE",
    "ASIC_PLACEMENTS",
    "ASSEMBLED_SHAPE",
    "MIN_TRUSTED_VALUE",
    "SATURATED_VALUE",
)
BINNED_RAYONIX_METADATA = (
    "DETECTOR",
    "BEAM_CENTER_X",
    "BEAM_CENTER_Y",
    "BINNING",
    "NATIVE_PIXEL_SIZE",
    "PIXEL_SIZE",
    "SIZE1",
    "SIZE2",
    "HOLE_RADIUS",
    "MIN_TRUSTED_VALUE",
    "SATURATED_VALUE",
)
REQUIRED_METADATA = {
    IDH5_VERSION: IDH5_METADATA,
    RAW_CSPAD_VERSION: RAW_CSPAD_METADATA,
    BINNED_RAYONIX_VERSION: BINNED_RAYONIX_METADATA,
}
#: Name of the per-chunk pixel dataset in each layout.
PIXEL_DATASET = {IDH5_VERSION: "images", RAW_CSPAD_VERSION: "asics", BINNED_RAYONIX_VERSION: "images"}

CSPAD_DETECTOR_NAME = "CSPAD"
RAYONIX_DETECTOR_NAME = "Rayonix MX170-HS"


class LayoutError(Sorry, ValueError):
    """A file that claims one of our layouts but cannot be read; the message names the file.

    A ``Sorry`` so that DIALS commands print the message alone, without a traceback."""


class ImageIndexError(LayoutError, IndexError):
    """An image index outside the file."""


def _chunk_name(number):
    # zero-padded so that sorted names are the image order
    return "%06d" % number


class _ChunkedWriter:
    """Shared machinery: atomic temporary file, metadata, per-shot datasets split into chunks."""

    version = None
    pixel_dataset = "images"

    def __init__(self, path, pixel_shape, chunk_size):
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.path = os.fspath(path)
        self.pixel_shape = tuple(int(n) for n in pixel_shape)
        self.chunk_size = int(chunk_size)
        self.n_images = 0
        self._stack = None
        self._h5 = None
        self._chunk = None

    def _write_metadata(self, metadata):
        raise NotImplementedError

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._h5 = self._stack.enter_context(h5py.File(tmp, "w"))
        meta = self._h5.create_group("metadata")
        meta[VERSION_KEYS[self.version].split("/", 1)[1]] = self.version
        self._write_metadata(meta)
        self._h5.create_group("data")
        return self

    def __exit__(self, exc_type, exc, tb):
        self._h5 = self._chunk = None
        # closes the HDF5 file first, then renames (or deletes the temporary file on error)
        return self._stack.__exit__(exc_type, exc, tb)

    def _new_chunk(self):
        group = self._h5["data"].create_group(_chunk_name(self.n_images // self.chunk_size))
        group.create_dataset(
            self.pixel_dataset,
            shape=(0,) + self.pixel_shape,
            maxshape=(self.chunk_size,) + self.pixel_shape,
            chunks=(1,) + self.pixel_shape,
            dtype=np.int32,
        )
        group.create_dataset("distance", shape=(0,), maxshape=(self.chunk_size,), dtype=np.float64)
        group.create_dataset("wavelength", shape=(0,), maxshape=(self.chunk_size,), dtype=np.float64)
        group.create_dataset(
            "timestamp", shape=(0,), maxshape=(self.chunk_size,), dtype=h5py.string_dtype()
        )
        return group

    def _append(self, pixels, distance_mm, wavelength_A, timestamp):
        if self._h5 is None:
            raise RuntimeError(f"{type(self).__name__} must be used as a context manager")
        pixels = np.asarray(pixels)
        if pixels.shape != self.pixel_shape:
            raise ValueError(f"{self.path}: expected pixels of shape {self.pixel_shape}, got {pixels.shape}")
        if not np.issubdtype(pixels.dtype, np.integer):
            raise ValueError(f"{self.path}: pixels must be integers, got {pixels.dtype}")
        if not (distance_mm > 0 and wavelength_A > 0):
            raise ValueError(f"{self.path}: distance and wavelength must be positive")
        if self.n_images % self.chunk_size == 0:
            self._chunk = self._new_chunk()
        slot = self.n_images % self.chunk_size
        for name, value in (
            (self.pixel_dataset, pixels.astype(np.int32, copy=False)),
            ("distance", float(distance_mm)),
            ("wavelength", float(wavelength_A)),
            ("timestamp", "" if timestamp is None else str(timestamp)),
        ):
            dataset = self._chunk[name]
            dataset.resize(slot + 1, axis=0)
            dataset[slot] = value
        self.n_images += 1


class Idh5Writer(_ChunkedWriter):
    """CXIDB id-76 ``idh5_v1.0`` files: one assembled 2-D integer image per shot."""

    version = IDH5_VERSION

    def __init__(
        self,
        path,
        *,
        image_shape,
        pixel_size_mm,
        beam_center_mm,
        min_trusted_value,
        saturated_value,
        active_areas=None,
        chunk_size=1000,
    ):
        super().__init__(path, image_shape, chunk_size)
        self.pixel_size_mm = float(pixel_size_mm)
        self.beam_center_mm = tuple(float(v) for v in beam_center_mm)
        self.trusted = (np.float64(min_trusted_value), np.float64(saturated_value))
        rows, cols = self.pixel_shape
        self.active_areas = [0, 0, rows, cols] if active_areas is None else [int(v) for v in active_areas]
        if len(self.active_areas) % 4:
            raise ValueError("active_areas needs 4 numbers per tile")

    def _write_metadata(self, meta):
        rows, cols = self.pixel_shape
        meta["BEAM_CENTER_X"], meta["BEAM_CENTER_Y"] = self.beam_center_mm
        meta["PIXEL_SIZE"] = self.pixel_size_mm
        meta["SIZE1"] = np.int64(cols)  # fast (x) size, as dxtbx's image_size = (fast, slow)
        meta["SIZE2"] = np.int64(rows)
        meta["MIN_TRUSTED_VALUE"], meta["SATURATED_VALUE"] = self.trusted
        meta["ACTIVE_AREAS"] = np.array(self.active_areas, dtype=np.int32)

    def append(self, image, distance_mm, wavelength_A, timestamp=None):
        self._append(image, distance_mm, wavelength_A, timestamp)


class RawCspadWriter(_ChunkedWriter):
    """Raw CSPAD shots: the (64, 185, 194) ASIC stack per shot plus the ASIC placements."""

    version = RAW_CSPAD_VERSION
    pixel_dataset = "asics"

    def __init__(self, path, *, beam_center_mm, min_trusted_value, saturated_value, chunk_size=1000):
        super().__init__(path, (cspad.N_ASICS,) + cspad.ASIC_SHAPE, chunk_size)
        self.beam_center_mm = tuple(float(v) for v in beam_center_mm)
        self.trusted = (np.float64(min_trusted_value), np.float64(saturated_value))

    def _write_metadata(self, meta):
        meta["DETECTOR"] = CSPAD_DETECTOR_NAME
        meta["BEAM_CENTER_X"], meta["BEAM_CENTER_Y"] = self.beam_center_mm
        meta["PIXEL_SIZE"] = cspad.PIXEL_SIZE_MM
        meta["ASIC_SHAPE"] = np.array(cspad.ASIC_SHAPE, dtype=np.int32)
        meta["ASIC_PLACEMENTS"] = cspad.asic_placements().astype(np.int32)
        meta["ASSEMBLED_SHAPE"] = np.array(cspad.ASSEMBLED_SHAPE, dtype=np.int32)
        meta["MIN_TRUSTED_VALUE"], meta["SATURATED_VALUE"] = self.trusted

    def append(self, asics, distance_mm, wavelength_A, timestamp=None):
        self._append(asics, distance_mm, wavelength_A, timestamp)


class BinnedRayonixWriter(_ChunkedWriter):
    """Rayonix images binned in hardware: binning, pixel size and central hole recorded."""

    version = BINNED_RAYONIX_VERSION

    def __init__(
        self,
        path,
        *,
        binning=2,
        native_pixel_size_mm=0.044,
        image_shape=(1920, 1920),
        beam_center_mm,
        hole_radius_px,
        min_trusted_value,
        saturated_value,
        chunk_size=1000,
    ):
        super().__init__(path, image_shape, chunk_size)
        self.binning = int(binning)
        if self.binning < 1:
            raise ValueError("binning must be at least 1")
        self.native_pixel_size_mm = float(native_pixel_size_mm)
        self.beam_center_mm = tuple(float(v) for v in beam_center_mm)
        self.hole_radius_px = float(hole_radius_px)
        self.trusted = (np.float64(min_trusted_value), np.float64(saturated_value))

    def _write_metadata(self, meta):
        rows, cols = self.pixel_shape
        meta["DETECTOR"] = RAYONIX_DETECTOR_NAME
        meta["BEAM_CENTER_X"], meta["BEAM_CENTER_Y"] = self.beam_center_mm
        meta["BINNING"] = np.int64(self.binning)
        meta["NATIVE_PIXEL_SIZE"] = self.native_pixel_size_mm
        meta["PIXEL_SIZE"] = self.native_pixel_size_mm * self.binning
        meta["SIZE1"] = np.int64(cols)
        meta["SIZE2"] = np.int64(rows)
        meta["HOLE_RADIUS"] = self.hole_radius_px
        meta["MIN_TRUSTED_VALUE"], meta["SATURATED_VALUE"] = self.trusted

    def append(self, image, distance_mm, wavelength_A, timestamp=None):
        self._append(image, distance_mm, wavelength_A, timestamp)


WRITERS = {"idh5": Idh5Writer, "raw_cspad": RawCspadWriter, "rayonix_binned": BinnedRayonixWriter}


def open_writer(layout, path, **kwargs):
    """The writer for ``layout`` (one of WRITERS), to be used as a context manager."""
    try:
        writer = WRITERS[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(WRITERS)}") from None
    return writer(path, **kwargs)


# --------------------------------------------------------------------------------------- reading


def _as_text(value):
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def sniff_version(path):
    """The layout version string of ``path``, or None for anything else; never raises."""
    try:
        with h5py.File(path, "r") as h5:
            for version, key in VERSION_KEYS.items():
                if key in h5 and isinstance(h5[key], h5py.Dataset):
                    found = _as_text(h5[key][()])
                    if found == version:
                        return version
    except Exception:  # not HDF5, truncated, unreadable: simply not ours
        return None
    return None


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def damaged_version(path, head_bytes=1 << 20):
    """For an HDF5 file that h5py cannot open (truncated, damaged) but whose first MiB carries one
    of our version strings, that version; None otherwise. Never raises."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(head_bytes)
    except OSError:
        return None
    if HDF5_SIGNATURE not in head[:4096]:
        return None
    found = [version for version in VERSION_KEYS if version.encode() in head]
    if not found:
        return None
    try:
        with h5py.File(path, "r"):
            return None  # opens: not damaged at this level
    except Exception:
        return found[0]


def open_layout(path, version):
    """The :class:`LayoutFile` of ``path``, shared while the file is unchanged (same size and
    modification time): dxtbx makes one format instance per still of a run, i.e. opens and checks the
    same file once per image, at each load of an experiment list."""
    stat = os.stat(path)
    return _open_layout(os.path.realpath(path), version, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _open_layout(path, version, mtime_ns, size):
    return LayoutFile(path, version)  # an error is raised, never cached


def understands(path, version):
    """What the Format classes' ``understand`` says: a consistent ``version`` file, or a damaged file
    of any of our layouts (claimed so that the reader reports it clearly; stock dxtbx HDF5 formats
    would otherwise crash on it inside the registry).

    The answer is kept while the file is unchanged: dxtbx asks every candidate Format once per still,
    and without it opening a 500-still run spent ~1.5 s opening the same file 1 500 times."""
    try:
        stat = os.stat(path)
    except (OSError, TypeError, ValueError):
        return False
    return _understands(os.path.realpath(path), version, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _understands(path, version, mtime_ns, size):
    return LayoutFile.check(path, version) or damaged_version(path) is not None


def _expected_pixel_shape(version, meta):
    if version == RAW_CSPAD_VERSION:
        return (cspad.N_ASICS,) + tuple(int(n) for n in meta["ASIC_SHAPE"])
    return (int(meta["SIZE2"]), int(meta["SIZE1"]))


class LayoutFile:
    """Checked, read-only view of one of our layouts: metadata, image index, per-shot values.

    Construction checks everything a reader needs without reading pixels, raising LayoutError
    (naming the file) on any inconsistency; ``LayoutFile.check(path, version)`` is the silent
    boolean form used by the Format classes' ``understand``.
    """

    def __init__(self, path, version):
        self.path = os.fspath(path)
        self.version = version
        self.derived = {}  # values the readers compute from this file (static masks), kept with it
        try:
            h5 = h5py.File(self.path, "r")
        except Exception as error:
            damaged = damaged_version(self.path)
            if damaged is not None:
                raise LayoutError(
                    f"{self.path}: HDF5 cannot open this {damaged} file, it is truncated or damaged "
                    f"({error}); copy or write it again"
                ) from None  # the message says it all; DIALS then prints it without a traceback
            raise LayoutError(f"{self.path}: not a readable {version} file ({error})") from None
        try:
            with h5:
                self._load(h5)
        except LayoutError:
            raise
        except Exception as error:
            raise LayoutError(f"{self.path}: not a readable {version} file ({error})") from None

    def _fail(self, what):
        raise LayoutError(f"{self.path}: {what}; rewrite it with dials_cnn.layouts ({self.version})")

    def _load(self, h5):
        if sniff_version(self.path) != self.version:
            self._fail(f"version string is not {self.version}")
        meta = h5["metadata"]
        missing = [name for name in REQUIRED_METADATA[self.version] if name not in meta]
        if missing:
            self._fail("missing metadata " + ", ".join(missing))
        self.metadata = {}
        for name in REQUIRED_METADATA[self.version]:
            value = meta[name][()]
            text = _as_text(value)
            self.metadata[name] = text if text is not None else np.asarray(value)
        for name, value in self.metadata.items():
            if name == "DETECTOR":
                continue
            if not (isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.number)):
                self._fail(f"metadata {name} is not a number")
            if not np.all(np.isfinite(value)):
                self._fail(f"metadata {name} is not finite")
        if not float(self.metadata["PIXEL_SIZE"]) > 0:
            self._fail("PIXEL_SIZE is not positive")
        self.pixel_shape = _expected_pixel_shape(self.version, self.metadata)
        if self.version == RAW_CSPAD_VERSION:
            if self.pixel_shape != (cspad.N_ASICS,) + cspad.ASIC_SHAPE:
                self._fail(f"ASIC_SHAPE is {self.pixel_shape[1:]}, not the CSPAD's {cspad.ASIC_SHAPE}")
            if np.shape(self.metadata["ASIC_PLACEMENTS"]) != (cspad.N_ASICS, 3):
                self._fail("ASIC_PLACEMENTS is not a 64 x 3 table of (row0, col0, k)")
        pixel_name = PIXEL_DATASET[self.version]
        if "data" not in h5 or not isinstance(h5["data"], h5py.Group):
            self._fail("no data group")
        self.chunks, counts, distances, wavelengths, timestamps = [], [], [], [], []
        for name in sorted(h5["data"]):
            group = h5["data"][name]
            for needed in (pixel_name, "distance", "wavelength"):
                if needed not in group:
                    self._fail(f"data/{name} has no {needed}")
            pixels = group[pixel_name]
            if not np.issubdtype(pixels.dtype, np.integer):
                self._fail(f"data/{name}/{pixel_name} holds {pixels.dtype}, not integers")
            if pixels.shape[1:] != self.pixel_shape:
                self._fail(
                    f"data/{name}/{pixel_name} has images of shape {pixels.shape[1:]}, "
                    f"metadata says {self.pixel_shape}"
                )
            n = pixels.shape[0]
            distance = np.asarray(group["distance"][()], dtype=float).reshape(-1)
            wavelength = np.asarray(group["wavelength"][()], dtype=float).reshape(-1)
            if len(distance) != n or len(wavelength) != n:
                self._fail(f"data/{name} has {n} images but {len(distance)} distances, {len(wavelength)} wavelengths")
            if "timestamp" in group and group["timestamp"].shape == (n,):
                stamps = [_as_text(t) if _as_text(t) is not None else str(t) for t in group["timestamp"][()]]
            else:
                stamps = [""] * n
            self.chunks.append(name)
            counts.append(n)
            distances.append(distance)
            wavelengths.append(wavelength)
            timestamps.extend(stamps)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if self.offsets[-1] == 0:
            self._fail("no images")
        self.distances = np.concatenate(distances)
        self.wavelengths = np.concatenate(wavelengths)
        self.timestamps = timestamps
        if not (np.all(self.distances > 0) and np.all(self.wavelengths > 0)):
            self._fail("non-positive distance or wavelength")

    @classmethod
    def check(cls, path, version):
        """True if ``path`` is a consistent file of ``version``; cheap and silent (no pixels read)."""
        if sniff_version(path) != version:
            return False
        try:
            open_layout(path, version)
        except Exception:
            return False
        return True

    @property
    def n_images(self):
        return int(self.offsets[-1])

    def locate(self, index):
        """(chunk name, index within the chunk) of image ``index``."""
        if not 0 <= index < self.n_images:
            raise ImageIndexError(f"{self.path}: image index {index} is outside 0..{self.n_images - 1}")
        chunk = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.chunks[chunk], int(index - self.offsets[chunk])

    def read_pixels(self, index):
        """The int32 pixel array of image ``index``; LayoutError naming the file if unreadable."""
        chunk, within = self.locate(index)
        try:
            with h5py.File(self.path, "r") as h5:
                pixels = h5["data"][chunk][PIXEL_DATASET[self.version]][within]
        except Exception as error:
            raise LayoutError(f"{self.path}: cannot read image {index} (data/{chunk}): {error}") from None
        return np.ascontiguousarray(pixels, dtype=np.int32)
