import numpy as np
import pytest
from dxtbx.format.Registry import get_format_class_for_file
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_cnn.format.FormatHDF5BinnedRayonix import FormatHDF5BinnedRayonix


def test_registry_picks_the_binned_rayonix_reader(rayonix, small_rayonix):
    assert get_format_class_for_file(rayonix.path) is FormatHDF5BinnedRayonix
    assert get_format_class_for_file(small_rayonix.path) is FormatHDF5BinnedRayonix


def test_small_file_over_chunks(small_rayonix):
    experiments = ExperimentListFactory.from_filenames([small_rayonix.path])
    assert len(experiments) == 5
    for i, experiment in enumerate(experiments):
        panel = experiment.detector[0]
        assert panel.get_pixel_size() == pytest.approx((0.176, 0.176))  # 0.044 mm x binning 4
        assert panel.get_image_size() == (64, 48)
        assert panel.get_distance() == pytest.approx(small_rayonix.distances[i])
        assert experiment.beam.get_wavelength() == pytest.approx(1.0 + 0.01 * i)
        assert panel.get_beam_centre_px(experiment.beam.get_s0()) == pytest.approx((32, 24))
        pixels = experiment.imageset.get_raw_data(0)[0].as_numpy_array()
        assert np.array_equal(pixels, small_rayonix.images[i])


def test_full_size_binned_rayonix(rayonix):
    experiments = ExperimentListFactory.from_filenames([rayonix.path])
    assert len(experiments) == 2
    panel = experiments[0].detector[0]
    assert panel.get_image_size() == (1920, 1920)
    assert panel.get_pixel_size() == pytest.approx((0.088, 0.088))
    assert panel.get_name() == "Rayonix MX170-HS binned 2x2"
    assert panel.get_type() == "SENSOR_CCD"
    assert panel.get_beam_centre(experiments[0].beam.get_s0()) == pytest.approx((84.48, 84.48))
    assert [e.detector[0].get_distance() for e in experiments] == pytest.approx(rayonix.distances)
    pixels = experiments[1].imageset.get_raw_data(0)[0].as_numpy_array()
    assert np.array_equal(pixels, rayonix.images[1])
    mask = experiments[1].imageset.get_mask(0)[0].as_numpy_array()
    assert not mask[rayonix.hole].any()  # the central hole
    outside = ~rayonix.hole
    # elsewhere only the trusted range masks: Poisson zeros sit at the trusted minimum's edge
    assert np.array_equal(mask[outside], rayonix.images[1][outside] > -1)
    assert rayonix.hole.sum() == pytest.approx(np.pi * 30**2, rel=0.02)
