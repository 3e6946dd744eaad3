import os

import h5py
import numpy as np
import pytest

from dials_cnn import cspad, layouts


def idh5_kwargs(**overrides):
    kwargs = dict(
        image_shape=(8, 12),
        pixel_size_mm=0.1,
        beam_center_mm=(0.6, 0.4),
        min_trusted_value=-5,
        saturated_value=1000,
    )
    kwargs.update(overrides)
    return kwargs


def test_idh5_layout_dataset_by_dataset(small_idh5):
    with h5py.File(small_idh5.path, "r") as h5:
        meta = h5["metadata"]
        assert h5py.check_string_dtype(meta["idh5_version"].dtype)
        assert meta["idh5_version"][()].decode() == "idh5_v1.0"
        assert meta["BEAM_CENTER_X"][()] == 3.3 and meta["BEAM_CENTER_Y"][()] == 2.2
        assert meta["PIXEL_SIZE"][()] == 0.11
        assert (meta["SIZE1"][()], meta["SIZE2"][()]) == (56, 40)  # fast, slow
        assert (meta["MIN_TRUSTED_VALUE"][()], meta["SATURATED_VALUE"][()]) == (-10, 60000)
        assert list(meta["ACTIVE_AREAS"][()]) == [2, 3, 18, 27, 22, 29, 38, 53]
        chunks = list(h5["data"])
        assert chunks == sorted(chunks) == ["000000", "000001", "000002"]
        assert [h5["data"][c]["images"].shape[0] for c in chunks] == [2, 2, 1]
        images = h5["data/000000/images"]
        assert images.dtype == np.int32 and images.chunks == (1, 40, 56)
        assert h5["data/000001/distance"].dtype == np.float64
        assert list(h5["data/000001/distance"][()]) == [103.0, 104.5]
        assert list(h5["data/000002/wavelength"][()]) == [1.34]
        assert h5["data/000000/timestamp"][0].decode() == "2015100.0"
        stacked = np.concatenate([h5["data"][c]["images"][()] for c in chunks])
    assert np.array_equal(stacked, np.array(small_idh5.images))


def test_raw_cspad_layout_records_the_asic_geometry(raw_cspad):
    with h5py.File(raw_cspad.path, "r") as h5:
        meta = h5["metadata"]
        assert meta["layout_version"][()].decode() == layouts.RAW_CSPAD_VERSION
        assert meta["DETECTOR"][()].decode() == "CSPAD"
        assert np.array_equal(meta["ASIC_PLACEMENTS"][()], cspad.asic_placements())
        assert list(meta["ASIC_SHAPE"][()]) == [185, 194]
        assert list(meta["ASSEMBLED_SHAPE"][()]) == [1765, 1765]
        assert meta["PIXEL_SIZE"][()] == 0.11
        asics = h5["data/000001/asics"]
        assert asics.shape == (1, 64, 185, 194) and asics.dtype == np.int32
        assert np.array_equal(asics[0], raw_cspad.shots[1])


def test_binned_rayonix_layout_records_binning(small_rayonix):
    with h5py.File(small_rayonix.path, "r") as h5:
        meta = h5["metadata"]
        assert meta["layout_version"][()].decode() == layouts.BINNED_RAYONIX_VERSION
        assert meta["BINNING"][()] == 4
        assert meta["NATIVE_PIXEL_SIZE"][()] == 0.044
        assert meta["PIXEL_SIZE"][()] == pytest.approx(0.176)
        assert meta["HOLE_RADIUS"][()] == 5
        assert (meta["SIZE1"][()], meta["SIZE2"][()]) == (64, 48)


def test_writer_is_atomic(tmp_path):
    target = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="stop"):
        with layouts.Idh5Writer(target, **idh5_kwargs()) as writer:
            writer.append(np.ones((8, 12), dtype=np.int16), 100, 1.0)
            assert not target.exists()  # nothing visible while writing
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []  # no file, no temporary left behind
    with layouts.Idh5Writer(target, **idh5_kwargs()) as writer:
        writer.append(np.ones((8, 12), dtype=np.int16), 100, 1.0)
    assert os.listdir(tmp_path) == ["run.h5"]


def test_writer_refuses_bad_images(tmp_path):
    with layouts.Idh5Writer(tmp_path / "run.h5", **idh5_kwargs()) as writer:
        with pytest.raises(ValueError, match="shape"):
            writer.append(np.ones((12, 8), dtype=np.int32), 100, 1.0)
        with pytest.raises(ValueError, match="integers"):
            writer.append(np.ones((8, 12)), 100, 1.0)
        with pytest.raises(ValueError, match="positive"):
            writer.append(np.ones((8, 12), dtype=np.int32), 0, 1.0)
    raw = layouts.RawCspadWriter(tmp_path / "raw.h5", beam_center_mm=(1, 1), min_trusted_value=0, saturated_value=9)
    with raw, pytest.raises(ValueError, match="shape"):
        raw.append(np.ones((64, 194, 185), dtype=np.int32), 100, 1.0)


def test_open_writer_picks_the_layout(tmp_path):
    with layouts.open_writer("rayonix_binned", tmp_path / "r.h5", image_shape=(6, 6), beam_center_mm=(0.3, 0.3),
                             hole_radius_px=1, min_trusted_value=0, saturated_value=9) as writer:
        assert isinstance(writer, layouts.BinnedRayonixWriter)
        writer.append(np.zeros((6, 6), dtype=np.int32), 50, 1.0)
    assert layouts.sniff_version(tmp_path / "r.h5") == layouts.BINNED_RAYONIX_VERSION
    with pytest.raises(ValueError, match="unknown layout"):
        layouts.open_writer("cbf", tmp_path / "c.h5")


def test_layout_file_indexes_images_across_chunks(small_idh5):
    layout = layouts.LayoutFile(small_idh5.path, layouts.IDH5_VERSION)
    assert layout.n_images == 5
    assert [layout.locate(i) for i in range(5)] == [
        ("000000", 0), ("000000", 1), ("000001", 0), ("000001", 1), ("000002", 0)]
    assert np.array_equal(layout.read_pixels(3), small_idh5.images[3])
    assert list(layout.distances) == small_idh5.distances
    with pytest.raises(layouts.ImageIndexError, match="small.h5"):
        layout.locate(5)


def test_sniff_version_is_silent_on_other_files(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not HDF5")
    assert layouts.sniff_version(text) is None
    assert layouts.sniff_version(tmp_path / "missing.h5") is None
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["metadata/idh5_version"] = 3
    assert layouts.sniff_version(tmp_path / "other.h5") is None


def test_understands_follows_a_file_that_changes(tmp_path):
    """The Format classes' answer is kept per file state: a file rewritten in place (live mode) is
    judged again, as what it is now."""
    path = tmp_path / "run.h5"
    path.write_bytes(b"not yet HDF5")
    assert not layouts.understands(path, layouts.BINNED_RAYONIX_VERSION)
    with layouts.open_writer("rayonix_binned", path, image_shape=(6, 6), beam_center_mm=(0.3, 0.3),
                             hole_radius_px=1, min_trusted_value=0, saturated_value=9) as writer:
        writer.append(np.zeros((6, 6), dtype=np.int32), 50, 1.0)
    assert layouts.understands(path, layouts.BINNED_RAYONIX_VERSION)
    assert not layouts.understands(path, layouts.IDH5_VERSION)
    os.remove(path)
    assert not layouts.understands(path, layouts.BINNED_RAYONIX_VERSION)
