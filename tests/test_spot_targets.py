"""Dense spot targets: the map marks where the simulator's visible spots are, aligned with the input."""

import numpy as np
import pytest

from dials_cnn.augment import GeometricAugment
from dials_cnn.preprocess import KE2018, PreprocessParams, prepare
from dials_cnn.projection import flat_from_array
from dials_cnn.simulate import simulate_image
from dials_cnn.spot_targets import BACKGROUND, SPOT, spot_target_map

PARAMS = PreprocessParams(pipeline="native", crop=256, bin=2, lcn_window=21)
MARGIN, STRIDE = 16, 8


@pytest.fixture(scope="module")
def hit_still():
    for index in range(40):
        still = simulate_image("LO19", 7, index, vary_beam_centre=True)
        if still.truth["label"] == "HIT":
            return still
    raise AssertionError("no HIT among 40 LO19 stills")


def test_the_map_marks_every_visible_spot_of_a_simulated_still(hit_still):
    target = spot_target_map(hit_still.spots, hit_still.beam_centre_px, PARAMS, MARGIN, STRIDE)
    side = (PARAMS.crop + 2 * MARGIN) // STRIDE
    assert target.shape == (side, side) and target.dtype == np.uint8
    assert set(np.unique(target)) <= {BACKGROUND, SPOT}
    cell = STRIDE * PARAMS.bin  # native pixels per cell
    cx, cy = hit_still.beam_centre_px
    half = (PARAMS.crop + 2 * MARGIN) * PARAMS.bin / 2
    visible = hit_still.spots["visible"]
    x, y = hit_still.spots["x"][visible], hit_still.spots["y"][visible]
    inside = (np.abs(x - cx) < half - cell) & (np.abs(y - cy) < half - cell)
    assert inside.sum() >= 5
    top, left = int(round(cy - half)), int(round(cx - half))
    rows = ((y[inside] - top) // cell).astype(int)
    columns = ((x[inside] - left) // cell).astype(int)
    assert np.all(target[rows, columns] == SPOT)
    # one mark per occupied cell, and nothing else marked
    assert np.count_nonzero(target == SPOT) <= visible.sum()
    assert np.count_nonzero(target == SPOT) >= len(set(zip(rows, columns)))


def test_marked_cells_are_where_the_input_is_bright(hit_still):
    flat = flat_from_array(hit_still.image, hit_still.beam_centre_px, hit_still.pixel_size_mm, hit_still.mask)
    x = prepare(flat, PARAMS, margin=MARGIN)
    target = spot_target_map(hit_still.spots, hit_still.beam_centre_px, PARAMS, MARGIN, STRIDE)
    side = target.shape[0]
    cell_max = x.reshape(side, STRIDE, side, STRIDE).max(axis=(1, 3))
    assert np.median(cell_max[target == SPOT]) > 2 * np.median(cell_max[target == BACKGROUND])


def test_a_miss_without_crystal_has_an_empty_map():
    for index in range(60):
        still = simulate_image("L498", 3, index)
        if not still.truth["crystal_present"]:
            target = spot_target_map(still.spots, still.beam_centre_px, PARAMS, MARGIN, STRIDE)
            assert not np.any(target == SPOT)
            return
    raise AssertionError("no still without a crystal among 60 L498 stills")


def test_the_papers_whole_image_pipeline_has_no_spot_map(hit_still):
    with pytest.raises(ValueError, match="beam-centred"):
        spot_target_map(hit_still.spots, hit_still.beam_centre_px, KE2018, 0, STRIDE)


def test_augmented_maps_follow_their_images():
    """One bright pixel per image: after random shifts, flips and rotations the map still marks its cell."""
    rng = np.random.default_rng(0)
    crop, stride, margin = 32, 4, 8
    side = crop + 2 * margin
    n = 64
    inputs = np.zeros((n, side, side), np.float32)
    maps = np.zeros((n, side // stride, side // stride), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, side, 2)
        inputs[i, y, x] = 1.0
        maps[i, y // stride, x // stride] = SPOT
    window = np.zeros((side // stride,) * 2, np.float32)
    window[: side // stride // 2] = 1.0  # the upper half, relative to the beam at the centre
    crops, cropped_maps, windows = GeometricAugment(max_shift=margin).crops_with_maps(
        inputs, maps, window, np.arange(n), crop, stride, rng)
    checked = 0
    for image, spot_map, mask in zip(crops, cropped_maps, windows):
        assert mask.sum() > 0  # the window moves with the image, it never leaves it
        if image.max() == 0:
            assert not np.any(spot_map == SPOT)  # the pixel was shifted out, and so was its mark
            continue
        y, x = np.unravel_index(image.argmax(), image.shape)
        assert spot_map[y // stride, x // stride] == SPOT and np.count_nonzero(spot_map) == 1
        checked += 1
    assert checked > n // 3
