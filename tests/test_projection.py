"""Flattening dxtbx images: single panels as stored, multi-panel detectors on a virtual plane."""

import numpy as np
import pytest
from dxtbx.format.FormatCBFMini import FormatCBFMini
from dxtbx.model import BeamFactory, Detector, DetectorFactory
from dxtbx.model.experiment_list import ExperimentListFactory
from scitbx.array_family import flex

from dials_cnn import layouts
from dials_cnn.projection import build_projection, flat_from_array, flatten_image, projection_for

PIXEL = 0.172
PANEL = (20, 10)  # fast, slow
GAP = 3  # pixels between modules, as between Pilatus modules


def modular_detector(distance=100.0, gap=GAP):
    """A 2 x 2 Pilatus-like detector normal to the beam, modules separated by ``gap`` pixels."""
    detector = Detector()
    nfast, nslow = PANEL
    width, height = (2 * nfast + gap) * PIXEL, (2 * nslow + gap) * PIXEL
    for row in range(2):
        for col in range(2):
            panel = detector.add_panel()
            panel.set_image_size(PANEL)
            panel.set_pixel_size((PIXEL, PIXEL))
            panel.set_trusted_range((-1, 1000))
            origin = (-width / 2 + col * (nfast + gap) * PIXEL, height / 2 - row * (nslow + gap) * PIXEL, -distance)
            panel.set_frame((1, 0, 0), (0, -1, 0), origin)
    return detector


def test_modules_land_where_they_are_with_zero_gaps():
    beam = BeamFactory.simple(1.0)
    projection = build_projection(modular_detector(), beam)
    nfast, nslow = PANEL
    assert projection.shape == (2 * nslow + GAP, 2 * nfast + GAP)
    assert projection.pixel_size_mm == pytest.approx(PIXEL)
    # the beam hits the middle of the central gap
    assert projection.beam_centre_px == pytest.approx((nfast + GAP / 2, nslow + GAP / 2), abs=1e-6)
    panels = [np.full((nslow, nfast), 10 * (k + 1), np.int32) for k in range(4)]
    panels[3][2, 5] = 999  # one marked pixel of module 3 (lower right)
    flat = projection.flatten(panels)
    assert flat.data.dtype == np.float32
    assert np.all(flat.data[:nslow, :nfast] == 10) and np.all(flat.data[:nslow, nfast + GAP :] == 20)
    assert np.all(flat.data[nslow + GAP :, :nfast] == 30)
    assert flat.data[nslow + GAP + 2, nfast + GAP + 5] == 999
    assert np.all(flat.data[nslow : nslow + GAP, :] == 0) and np.all(flat.data[:, nfast : nfast + GAP] == 0)
    assert not flat.mask[nslow + 1, 0] and flat.mask[0, 0]


def test_untrusted_pixels_are_zero_and_overloads_clipped():
    beam = BeamFactory.simple(1.0)
    projection = build_projection(modular_detector(), beam)
    panels = [np.full((PANEL[1], PANEL[0]), 5, np.int32) for _ in range(4)]
    panels[0][0, 0] = -1  # untrusted (Pilatus gap value)
    panels[0][0, 1] = 5000  # overload of a bright spot: kept, at the trusted maximum
    mask = [np.ones((PANEL[1], PANEL[0]), bool) for _ in range(4)]
    mask[0][0, 2] = False
    flat = projection.flatten(panels, mask)
    assert flat.data[0, 0] == 0 and not flat.mask[0, 0]
    assert flat.data[0, 1] == 1000
    assert flat.data[0, 2] == 0 and not flat.mask[0, 2]


def test_projection_is_cached_per_geometry():
    beam = BeamFactory.simple(1.0)
    assert projection_for(modular_detector(), beam) is projection_for(modular_detector(), beam)
    assert projection_for(modular_detector(), beam) is not projection_for(modular_detector(distance=120), beam)


def test_farther_modules_are_scaled_onto_the_plane():
    # One module twice as far: it covers half as many virtual pixels (rays from the sample).
    beam = BeamFactory.simple(1.0)
    detector = Detector()
    for distance, x0 in ((100.0, -10 * PIXEL), (200.0, 40 * PIXEL)):
        panel = detector.add_panel()
        panel.set_image_size((20, 20))
        panel.set_pixel_size((PIXEL, PIXEL))
        panel.set_trusted_range((-1, 1000))
        panel.set_frame((1, 0, 0), (0, -1, 0), (x0, 10 * PIXEL, -distance))
    projection = build_projection(detector, beam)
    flat = projection.flatten([np.full((20, 20), 1, np.int32), np.full((20, 20), 2, np.int32)])
    # the plane sits at the mean distance (150 mm): module 1 spans 20*150/100 = 30 px, module 2 15 px
    assert 25 <= (flat.data == 1).any(axis=0).sum() <= 31
    assert 12 <= (flat.data == 2).any(axis=0).sum() <= 16


@pytest.fixture(scope="module")
def cbf_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("cbf") / "single_0001.cbf"
    detector = DetectorFactory.simple("PAD", 100.0, (17.2, 15.5), "+x", "-y", (PIXEL, PIXEL), (200, 180), (-1, 1e6))
    data = np.random.default_rng(3).poisson(2, (180, 200)).astype(np.int32)
    data[7, 9] = -1
    FormatCBFMini.as_file(detector, BeamFactory.simple(1.0), None, None, flex.int(data), str(path))
    return path, data


def test_single_panel_file_is_used_as_stored(cbf_image):
    path, data = cbf_image
    imageset = ExperimentListFactory.from_filenames([str(path)])[0].imageset
    flat = flatten_image(imageset, 0)
    expected = np.where(data > -1, data, 0)
    np.testing.assert_array_equal(flat.data, expected)
    assert not flat.mask[7, 9]
    assert flat.beam_centre_px == pytest.approx((100.0, 90.0 + 0.1), abs=0.2)
    assert flat.pixel_size_mm == pytest.approx(PIXEL)


def test_format_static_mask_applies(tmp_path):
    # idh5 file of two tiles: pixels outside the (1-pixel shrunk) active areas are masked -> 0.
    path = tmp_path / "tiles.h5"
    image = np.full((40, 56), 7, np.int32)
    with layouts.Idh5Writer(
        path, image_shape=(40, 56), pixel_size_mm=0.11, beam_center_mm=(3.3, 2.2), min_trusted_value=-10,
        saturated_value=60000, active_areas=[2, 3, 18, 27, 22, 29, 38, 53], chunk_size=2,
    ) as writer:
        writer.append(image, 100.0, 1.3)
    imageset = ExperimentListFactory.from_filenames([str(path)])[0].imageset
    flat = flatten_image(imageset, 0)
    assert flat.data.shape == (40, 56)
    assert flat.data[0, 0] == 0 and not flat.mask[0, 0]
    assert flat.mask.sum() > 0 and np.all(flat.data[flat.mask] == 7)
    assert np.all(flat.data[~flat.mask] == 0)


def test_flat_from_array_clips_negatives():
    flat = flat_from_array(np.array([[-3, 4], [5, 6]]), mask=np.array([[1, 1], [0, 1]]))
    np.testing.assert_array_equal(flat.data, [[0, 4], [0, 6]])
    assert flat.beam_centre_px == (1.0, 1.0)


def test_external_mask_of_the_imageset_applies(cbf_image):
    from dxtbx.format.image import ImageBool

    path, data = cbf_image
    imageset = ExperimentListFactory.from_filenames([str(path)])[0].imageset
    mask = flex.bool(flex.grid(180, 200), True)
    mask[5 * 200 + 7] = False  # what a format's get_static_mask or dials.generate_mask puts there
    imageset.external_lookup.mask.data = ImageBool(mask)
    flat = flatten_image(imageset, 0)
    assert not flat.mask[5, 7] and flat.data[5, 7] == 0
    assert flat.mask.sum() == 180 * 200 - 2  # that pixel and the untrusted one


def test_the_compiled_cleaning_of_a_cut_is_the_numpy_one():
    """The int32 cut of a single panel (a strided view of the file's rows, as the classification
    reads it) cleaned by the compiled pass and by numpy (the int64 path): the same pixels and mask."""
    from dials_cnn import native
    from dials_cnn.projection import _clean

    assert native.function("clean_cut_i32") is not None, f"{native.LIBRARY} is missing: run make env"
    rng = np.random.default_rng(8)
    rows = rng.integers(-40, 70000, size=(300, 500), dtype=np.int32)
    cut = rows[:, 100:356]
    mask = rng.random((300, 500)) > 0.05
    for valid in (mask[:, 100:356], None):
        for low, high in ((-10.0, 65535.0), (0.0, 3000.0)):
            compiled = _clean(cut, valid, low, high)
            reference = _clean(cut.astype(np.int64), valid, low, high)
            assert compiled[0].dtype == np.float32 and compiled[1].dtype == bool
            np.testing.assert_array_equal(compiled[0], reference[0])
            np.testing.assert_array_equal(compiled[1], reference[1])
    assert compiled[1].sum() < compiled[1].size  # some pixels were below the trusted range
