import numpy as np
import pytest
from dxtbx.format.Registry import get_format_class_for_file
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_cnn import cspad, layouts
from dials_cnn.format.FormatHDF5CXIDB76 import FormatHDF5CXIDB76


def test_registry_picks_the_cxidb76_reader(small_idh5, cspad_idh5):
    assert get_format_class_for_file(small_idh5.path) is FormatHDF5CXIDB76
    assert get_format_class_for_file(cspad_idh5.path) is FormatHDF5CXIDB76


def test_images_models_and_pixels_per_index(small_idh5):
    experiments = ExperimentListFactory.from_filenames([small_idh5.path])
    assert len(experiments) == 5  # three chunks: 2 + 2 + 1 shots
    for i, experiment in enumerate(experiments):
        imageset = experiment.imageset
        assert imageset.get_format_class() is FormatHDF5CXIDB76
        assert imageset.indices()[0] == i
        pixels = imageset.get_raw_data(0)[0].as_numpy_array()
        assert pixels.dtype == np.int32
        assert np.array_equal(pixels, small_idh5.images[i])
        panel = experiment.detector[0]
        assert panel.get_distance() == pytest.approx(small_idh5.distances[i])
        assert experiment.beam.get_wavelength() == pytest.approx(small_idh5.wavelengths[i])
        assert panel.get_pixel_size() == pytest.approx((0.11, 0.11))
        assert panel.get_image_size() == (56, 40)
        assert panel.get_beam_centre(experiment.beam.get_s0()) == pytest.approx(small_idh5.beam)
        assert panel.get_fast_axis() == pytest.approx((1, 0, 0))
        assert panel.get_slow_axis() == pytest.approx((0, -1, 0))
        assert panel.get_trusted_range() == (-10, 60000)


def test_mask_is_active_areas_shrunk_by_one_pixel(small_idh5):
    good = np.zeros((40, 56), dtype=bool)
    good[3:17, 4:26] = True  # tile rows 2..17, cols 3..26 less a 1-pixel rim
    good[23:37, 30:52] = True
    experiments = ExperimentListFactory.from_filenames([small_idh5.path])
    for experiment in experiments:
        mask = experiment.imageset.get_mask(0)[0].as_numpy_array()
        assert np.array_equal(mask, good)


def test_mask_ands_the_trusted_range(tmp_path):
    image = np.full((40, 56), 20, dtype=np.int32)
    image[5, 5] = 60000  # saturated
    image[6, 6] = -11  # below the trusted minimum
    image[7, 7] = 59999
    path = tmp_path / "saturated.h5"
    with layouts.Idh5Writer(path, image_shape=(40, 56), pixel_size_mm=0.11, beam_center_mm=(3, 2),
                            min_trusted_value=-10, saturated_value=60000,
                            active_areas=[2, 3, 18, 27, 22, 29, 38, 53]) as writer:
        writer.append(image, 100, 1.0)
    mask = ExperimentListFactory.from_filenames([str(path)])[0].imageset.get_mask(0)[0].as_numpy_array()
    assert not mask[5, 5] and not mask[6, 6]
    assert mask[7, 7] and mask[8, 8]


def test_single_tile_means_no_static_mask(tmp_path):
    path = tmp_path / "rayonix_like.h5"
    with layouts.Idh5Writer(path, image_shape=(30, 30), pixel_size_mm=0.088, beam_center_mm=(1.32, 1.32),
                            min_trusted_value=-1, saturated_value=65535) as writer:
        writer.append(np.ones((30, 30), dtype=np.int32), 100, 1.0)
    reader = FormatHDF5CXIDB76(str(path))
    assert reader.get_static_mask() is None
    mask = ExperimentListFactory.from_filenames([str(path)])[0].imageset.get_mask(0)[0]
    assert mask.count(False) == 0


def test_full_size_cspad_idh5(cspad_idh5):
    experiments = ExperimentListFactory.from_filenames([cspad_idh5.path])
    assert len(experiments) == 2
    panel = experiments[0].detector[0]
    assert panel.get_image_size() == (1765, 1765)
    assert "CSPAD" in panel.get_name()
    assert panel.get_beam_centre_px(experiments[0].beam.get_s0()) == pytest.approx((882.5, 882.5))
    pixels = experiments[1].imageset.get_raw_data(0)[0].as_numpy_array()
    assert np.array_equal(pixels, cspad_idh5.images[1])
    mask = experiments[0].imageset.get_mask(0)[0].as_numpy_array()
    on_asic = cspad.asic_pixel_mask()
    assert not mask[~on_asic].any()  # gaps and the central hole
    rim = on_asic & ~cspad.assemble(np.pad(np.ones((64, 183, 192), bool), ((0, 0), (1, 1), (1, 1))))
    assert not mask[rim].any()  # ASIC edges shrunk by one pixel
    assert mask[on_asic & ~rim].all()
    assert rim[cspad.asic_border_pixels()].all()  # the bright junction lines are masked too
