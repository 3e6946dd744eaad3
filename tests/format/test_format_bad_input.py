"""Broken or foreign files are "not understood" (silently) or give one clear error naming the file."""

import os
import shutil
import subprocess

import h5py
import numpy as np
import pytest
from dxtbx.format.Registry import get_format_class_for_file

from dials_cnn import layouts
from dials_cnn.format.FormatHDF5BinnedRayonix import FormatHDF5BinnedRayonix
from dials_cnn.format.FormatHDF5CXIDB76 import FormatHDF5CXIDB76
from dials_cnn.format.FormatHDF5RawCspad import FormatHDF5RawCspad

OUR_FORMATS = (FormatHDF5CXIDB76, FormatHDF5RawCspad, FormatHDF5BinnedRayonix)


def truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def wrong_version(path):
    with h5py.File(path, "a") as h5:
        del h5["metadata/idh5_version"]
        h5["metadata/idh5_version"] = "idh5_v2.0"


def missing_pixel_size(path):
    with h5py.File(path, "a") as h5:
        del h5["metadata/PIXEL_SIZE"]


def float_images(path):
    with h5py.File(path, "a") as h5:
        images = h5["data/000001/images"][()]
        del h5["data/000001/images"]
        h5["data/000001/images"] = images.astype(np.float32)


def wrong_image_shape(path):
    with h5py.File(path, "a") as h5:
        h5["metadata/SIZE1"][()] = 55


def text_beam_centre(path):
    with h5py.File(path, "a") as h5:
        del h5["metadata/BEAM_CENTER_X"]
        h5["metadata/BEAM_CENTER_X"] = "centre"


def distances_missing(path):
    with h5py.File(path, "a") as h5:
        del h5["data/000002/distance"]


def no_images(path):
    with h5py.File(path, "a") as h5:
        del h5["data"]
        h5.create_group("data")


def not_hdf5(path):
    with open(path, "w") as handle:
        handle.write("idh5_v1.0 in a text file")


def hdf5_signature_then_garbage(path):
    with open(path, "wb") as handle:
        handle.write(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)


def foreign_hdf5(path):
    os.unlink(path)
    with h5py.File(path, "w") as h5:
        h5["entry/data"] = np.zeros((2, 3))


#: files our readers must leave to others, silently
BREAKAGES = [wrong_version, missing_pixel_size, text_beam_centre, float_images, wrong_image_shape, distances_missing,
             no_images, not_hdf5, foreign_hdf5]


@pytest.fixture(scope="module")
def broken_files(small_idh5, tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    files = {}
    for breakage in BREAKAGES:
        path = folder / f"{breakage.__name__}.h5"
        shutil.copy(small_idh5.path, path)
        breakage(path)
        files[breakage.__name__] = str(path)
    return files


@pytest.mark.parametrize("breakage", [b.__name__ for b in BREAKAGES])
def test_broken_file_is_not_understood_and_the_registry_goes_on(broken_files, breakage):
    path = broken_files[breakage]
    for format_class in OUR_FORMATS:
        assert format_class.understand(path) is False
    assert get_format_class_for_file(path) not in OUR_FORMATS


def test_hdf5_garbage_is_not_understood(tmp_path):
    # (stock dxtbx's FormatHDF5PAL.understand raises on such a file, so the registry cannot be asked)
    path = tmp_path / "garbage.h5"
    hdf5_signature_then_garbage(path)
    assert not any(format_class.understand(str(path)) for format_class in OUR_FORMATS)


@pytest.fixture(scope="module")
def truncated_files(small_idh5, raw_cspad, small_rayonix, tmp_path_factory):
    folder = tmp_path_factory.mktemp("truncated")
    files = []
    for written in (small_idh5, raw_cspad, small_rayonix):
        path = folder / ("truncated_" + os.path.basename(written.path))
        shutil.copy(written.path, path)
        truncate(path)
        files.append(str(path))
    return files


def test_truncated_file_of_ours_is_claimed_and_reported(truncated_files):
    """Truncated files of our layouts are claimed (stock dxtbx HDF5 formats would crash the registry
    on them) and opening one gives one clear error naming the file."""
    for path in truncated_files:
        assert get_format_class_for_file(path) in OUR_FORMATS
        with pytest.raises(layouts.LayoutError, match=rf"{os.path.basename(path)}: HDF5 cannot open this .* truncated"):
            get_format_class_for_file(path)(path)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_dials_import_of_a_truncated_file_says_so_without_a_traceback(truncated_files, which, tmp_path):
    path = truncated_files[which]
    result = subprocess.run(["/usr/bin/dials.import", path], cwd=tmp_path, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert f"{path}: HDF5 cannot open this" in output
    assert result.returncode != 0
    assert not (tmp_path / "imported.expt").exists()


def test_raw_cspad_with_wrong_asic_geometry_is_not_understood(raw_cspad, tmp_path):
    path = tmp_path / "bad_placements.h5"
    shutil.copy(raw_cspad.path, path)
    assert FormatHDF5RawCspad.understand(str(path))
    with h5py.File(path, "a") as h5:
        del h5["metadata/ASIC_PLACEMENTS"]
        h5["metadata/ASIC_PLACEMENTS"] = np.zeros((32, 3), dtype=np.int32)
    assert not FormatHDF5RawCspad.understand(str(path))


def test_dials_import_of_broken_files_ends_without_a_traceback(broken_files, tmp_path):
    result = subprocess.run(
        ["/usr/bin/dials.import", *broken_files.values(), "output.experiments=broken.expt"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "dials_cnn.format" not in output
    assert "Unable to handle" in output


def test_index_past_the_end_names_the_file(small_idh5):
    reader = FormatHDF5CXIDB76(small_idh5.path)
    for read in (reader.get_raw_data, reader.get_detector, reader.get_beam):
        with pytest.raises(layouts.ImageIndexError, match=r"small\.h5.*index 5 is outside 0\.\.4"):
            read(5)
    with pytest.raises(ValueError, match="small.h5"):
        reader.get_raw_data(-1)


def test_file_damaged_after_opening_gives_one_clear_error(small_idh5, tmp_path):
    path = tmp_path / "damaged.h5"
    shutil.copy(small_idh5.path, path)
    reader = FormatHDF5CXIDB76(str(path))
    truncate(path)
    with pytest.raises(layouts.LayoutError, match=r"damaged\.h5: cannot read image 4"):
        reader.get_raw_data(4)


def test_opening_a_wrong_file_directly_names_it(broken_files):
    with pytest.raises(Exception, match="wrong_version.h5"):
        FormatHDF5CXIDB76(broken_files["wrong_version"])
    with pytest.raises(layouts.LayoutError, match=r"missing_pixel_size\.h5: missing metadata PIXEL_SIZE"):
        layouts.LayoutFile(broken_files["missing_pixel_size"], layouts.IDH5_VERSION)
