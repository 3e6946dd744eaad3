import numpy as np
import pytest

from dials_cnn import cspad

STACK_SHAPE = (cspad.N_ASICS,) + cspad.ASIC_SHAPE


def placed_shape(k):
    return cspad.ASIC_SHAPE if k % 2 == 0 else cspad.ASIC_SHAPE[::-1]


def coverage():
    counts = np.zeros(cspad.ASSEMBLED_SHAPE, dtype=int)
    for row0, col0, k in cspad.asic_placements():
        h, w = placed_shape(k)
        assert row0 >= 0 and col0 >= 0
        assert row0 + h <= cspad.ASSEMBLED_SHAPE[0] and col0 + w <= cspad.ASSEMBLED_SHAPE[1]
        counts[row0 : row0 + h, col0 : col0 + w] += 1
    return counts


def test_placements_fit_the_frame_without_overlap():
    placements = cspad.asic_placements()
    assert placements.shape == (64, 3)
    assert np.issubdtype(placements.dtype, np.integer)
    counts = coverage()
    assert counts.max() == 1
    assert counts.sum() == 64 * 185 * 194


def test_quadrants_are_the_first_turned_by_90_degrees():
    mask = cspad.asic_pixel_mask()
    assert np.array_equal(np.rot90(mask), mask)
    assert np.array_equal(cspad.asic_pixel_mask(), coverage() == 1)


def test_central_hole_around_the_beam():
    row, col = cspad.CENTRE_PIXEL
    mask = cspad.asic_pixel_mask()
    assert not mask[row - 28 : row + 29, col - 28 : col + 29].any()  # 57 x 57 pixels free
    # but the hole is only a few tens of pixels: ASICs start within 60 pixels of the centre
    assert mask[row - 60 : row + 61, col - 60 : col + 61].any()


def test_assemble_round_trip_and_zeros_between_asics():
    stack = np.random.default_rng(0).integers(1, 1000, STACK_SHAPE, dtype=np.int32)
    frame = cspad.assemble(stack)
    assert frame.shape == cspad.ASSEMBLED_SHAPE and frame.dtype == np.int32
    assert np.array_equal(cspad.disassemble(frame), stack)
    assert not frame[~cspad.asic_pixel_mask()].any()
    assert np.count_nonzero(frame) == stack.size


def test_disassemble_then_assemble_keeps_asic_pixels_only():
    image = np.random.default_rng(1).integers(1, 9, cspad.ASSEMBLED_SHAPE)
    again = cspad.assemble(cspad.disassemble(image))
    mask = cspad.asic_pixel_mask()
    assert np.array_equal(again[mask], image[mask])
    assert not again[~mask].any()


def test_asic_orientation_follows_rot90():
    stack = np.zeros(STACK_SHAPE, dtype=np.int32)
    stack[:, 0, 0] = 1  # the first pixel read out of every ASIC
    frame = cspad.assemble(stack)
    for i, (row0, col0, k) in enumerate(cspad.asic_placements()):
        h, w = placed_shape(k)
        expected = np.rot90(stack[i], k)
        assert np.array_equal(frame[row0 : row0 + h, col0 : col0 + w], expected)


def test_asic_frame_transform_matches_assemble():
    for i in range(cspad.N_ASICS):
        stack = np.zeros(STACK_SHAPE, dtype=np.int8)
        slow, fast = 17 + i, 101 - i
        stack[i, slow, fast] = 1
        (row, col), = np.argwhere(cspad.assemble(stack))
        origin, fast_dir, slow_dir = cspad.asic_frame_transform(i)
        centre = origin + (fast + 0.5) * fast_dir + (slow + 0.5) * slow_dir
        assert np.allclose(centre, (row + 0.5, col + 0.5))


def test_active_areas_follow_the_cctbx_convention():
    tiles = np.array(cspad.active_areas()).reshape(-1, 4)
    assert tiles.shape == (64, 4)
    covered = np.zeros(cspad.ASSEMBLED_SHAPE, dtype=bool)
    for slow1, fast1, slow2, fast2 in tiles:  # x = slow, y = fast, lower-right exclusive
        assert (slow2 - slow1, fast2 - fast1) in (cspad.ASIC_SHAPE, cspad.ASIC_SHAPE[::-1])
        covered[slow1:slow2, fast1:fast2] = True
    assert np.array_equal(covered, cspad.asic_pixel_mask())


def test_asic_border_pixels_are_double_lines_at_each_sensor_junction():
    border = cspad.asic_border_pixels()
    assert border.sum() == 32 * 2 * 185  # 32 sensors, one line on each of their two ASICs
    assert not border[~cspad.asic_pixel_mask()].any()
    placements = cspad.asic_placements()
    for first in range(0, 64, 2):  # the two ASICs of a sensor, 4 pixels apart across the junction
        a, b = placements[first], placements[first + 1]
        if a[2] % 2 == 0:  # lying sensor: junction between columns
            left = min(a[1], b[1])
            junction = border[a[0] : a[0] + 185, left + 193 : left + 199]
            assert junction[:, [0, -1]].all() and not junction[:, 1:-1].any()
        else:
            top = min(a[0], b[0])
            junction = border[top + 193 : top + 199, a[1] : a[1] + 185]
            assert junction[[0, -1], :].all() and not junction[1:-1, :].any()


def test_wrong_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        cspad.assemble(np.zeros((63, 185, 194)))
    with pytest.raises(ValueError, match="shape"):
        cspad.disassemble(np.zeros((1764, 1765)))
