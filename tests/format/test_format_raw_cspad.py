import numpy as np
import pytest
from dxtbx.format.Registry import get_format_class_for_file
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_cnn import cspad
from dials_cnn.format.FormatHDF5RawCspad import FormatHDF5RawCspad


@pytest.fixture(scope="module")
def raw_experiments(raw_cspad):
    return ExperimentListFactory.from_filenames([raw_cspad.path])


@pytest.fixture(scope="module")
def assembled_experiments(cspad_idh5):
    return ExperimentListFactory.from_filenames([cspad_idh5.path])


def test_registry_picks_the_raw_cspad_reader(raw_cspad):
    assert get_format_class_for_file(raw_cspad.path) is FormatHDF5RawCspad


def test_sixty_four_asic_panels(raw_experiments, raw_cspad):
    assert len(raw_experiments) == 2
    for i, experiment in enumerate(raw_experiments):
        detector = experiment.detector
        assert len(detector) == 64
        assert all(panel.get_image_size() == (194, 185) for panel in detector)
        assert all(panel.get_pixel_size() == pytest.approx((0.11, 0.11)) for panel in detector)
        assert detector[45].get_name().startswith("CSPAD ASIC 45")
        assert detector[0].get_type() == "SENSOR_PAD"
        assert detector[0].get_trusted_range() == (-10, 65535)
        assert experiment.beam.get_wavelength() == pytest.approx(raw_cspad.wavelengths[i])
        assert detector[0].get_distance() == pytest.approx(raw_cspad.distances[i])
        panels = experiment.imageset.get_raw_data(0)
        assert len(panels) == 64
        stack = np.stack([p.as_numpy_array() for p in panels])
        assert stack.dtype == np.int32 and np.array_equal(stack, raw_cspad.shots[i])


def test_assembled_image_matches_the_paper_layout(raw_cspad):
    reader = FormatHDF5RawCspad(raw_cspad.path)
    assert np.array_equal(reader.get_assembled_image(0), cspad.assemble(raw_cspad.shots[0]))


def test_every_asic_pixel_sits_where_the_assembled_frame_puts_it(raw_experiments, assembled_experiments):
    """A pixel of ASIC k has the same lab position in the 64-panel reading as in the 1765 x 1765
    monolithic reading of the same shot (same beam centre and distance)."""
    raw_detector = raw_experiments[0].detector
    flat_panel = assembled_experiments[0].detector[0]
    # label every ASIC pixel, assemble once, and look up where each label landed
    labels = np.arange(1, 64 * 185 * 194 + 1, dtype=np.int32).reshape(64, 185, 194)
    frame = cspad.assemble(labels)
    rows, cols = np.nonzero(frame)
    where = np.empty((labels.size + 1, 2), dtype=np.int64)
    where[frame[rows, cols]] = np.stack([rows, cols], axis=1)
    rng = np.random.default_rng(5)
    for asic in range(64):
        for slow, fast in [(0, 0), (184, 193), tuple(rng.integers((185, 194)))]:
            row, col = where[labels[asic, slow, fast]]
            raw_xyz = raw_detector[asic].get_pixel_lab_coord((fast + 0.5, slow + 0.5))
            flat_xyz = flat_panel.get_pixel_lab_coord((col + 0.5, row + 0.5))
            assert raw_xyz == pytest.approx(flat_xyz, abs=1e-9)


def test_beam_passes_through_the_central_hole(raw_experiments):
    detector = raw_experiments[0].detector
    s0 = raw_experiments[0].beam.get_s0()
    with pytest.raises(RuntimeError):
        detector.get_ray_intersection(s0)  # no ASIC in the beam
    # the hole's centre: lab (0, 0) is the centre of assembled pixel (882, 882)
    row0, col0, k = cspad.asic_placements()[0]
    assert k == 0  # ASIC 0 lies unturned: its first pixel's corner is its top-left corner
    corner = detector[0].get_pixel_lab_coord((0, 0))
    assert corner[0] == pytest.approx((col0 - 882.5) * 0.11)
    assert corner[1] == pytest.approx((882.5 - row0) * 0.11)


def test_asic_edges_are_masked(raw_experiments):
    for panel_mask in raw_experiments[0].imageset.get_mask(0):
        mask = panel_mask.as_numpy_array()
        assert mask.shape == (185, 194)
        assert not mask[[0, -1], :].any() and not mask[:, [0, -1]].any()
        assert mask[1:-1, 1:-1].all()
