"""CSPAD geometry: where each of the 64 ASICs lands in the 1765 x 1765 monolithic array.

The paper's CXIDB-76 CSPAD images are the 64 ASICs (185 x 194 pixels, slow x fast) pasted into one
1765 x 1765 array with zeros between them. The real metrology is not available here, so this module
defines a realistic, fixed picture of the detector with integer offsets:

* one quadrant is a 2 x 2 grid of square blocks (392 x 392 pixels, 10 pixels apart); each block holds
  two 2x1 sensors, either both lying (185 x 392, stacked 22 rows apart) or both standing
  (392 x 185, side by side 22 columns apart), alternating like a chequerboard, as on the real device;
* a 2x1 sensor is two ASICs joined along their 185-pixel edge with a 4-pixel gap, which stands in for
  the wide pixels where the two ASICs meet (cctbx.xfel's cspad_tbx: "a two-by-one is 185-by-392
  pixels with a 4-pixel gap"); the sensor's fast axis runs through ASIC 0 into ASIC 1, and a
  standing sensor is a lying one turned by 90 degrees;
* quadrant 0 sits in the top-left corner, 16 rows and 28 columns short of the centre pixel (882, 882);
  quadrants 1-3 are quadrant 0 turned by 90, 180 and 270 degrees about the array centre (np.rot90),
  a pinwheel that leaves no ASIC pixel within the 57 x 57 square centred on the beam pixel;
  the ASICs span rows and columns 60..1704.

ASIC ``i`` belongs to quadrant ``i // 16``, sensor ``(i % 16) // 2`` and is the ``i % 2``-th ASIC of
that sensor. Its placement ``(row0, col0, k)`` means ``frame[row0:row0+h, col0:col0+w] =
np.rot90(asic, k)``.
"""

import numpy as np

ASIC_SHAPE = (185, 194)  # (slow, fast) pixels per ASIC
N_ASICS = 64
ASSEMBLED_SHAPE = (1765, 1765)
PIXEL_SIZE_MM = 0.11

#: Pixel (row, col) whose centre is the middle of the array, the nominal beam position.
CENTRE_PIXEL = (ASSEMBLED_SHAPE[0] // 2, ASSEMBLED_SHAPE[1] // 2)

_ASIC_GAP = 4  # columns between the two ASICs of a 2x1 sensor (cctbx: 185 x 392 with a 4-pixel gap)
_SENSOR_LENGTH = 2 * ASIC_SHAPE[1] + _ASIC_GAP  # 392
_BLOCK = _SENSOR_LENGTH  # a block holds two sensors in a 392 x 392 square
_SENSOR_GAP = _BLOCK - 2 * ASIC_SHAPE[0]  # 22 pixels between the two sensors of a block
_BLOCK_GAP = 10
_QUADRANT = 2 * _BLOCK + _BLOCK_GAP  # 794
_HOLE_ROWS, _HOLE_COLS = 16, 28  # quadrant 0 stops this far above / left of the centre pixel


def _placed_shape(k):
    return ASIC_SHAPE if k % 2 == 0 else ASIC_SHAPE[::-1]


def _quadrant0_placements():
    """(row0, col0, k) of the 16 ASICs of the top-left quadrant, in quadrant-local coordinates."""
    placements = []
    for block_row in range(2):
        for block_col in range(2):
            r_block = block_row * (_BLOCK + _BLOCK_GAP)
            c_block = block_col * (_BLOCK + _BLOCK_GAP)
            lying = (block_row + block_col) % 2 == 0
            for sensor in range(2):
                for asic in range(2):
                    if lying:  # sensor 185 x 391, ASICs side by side along the rows
                        r = r_block + sensor * (ASIC_SHAPE[0] + _SENSOR_GAP)
                        c = c_block + asic * (ASIC_SHAPE[1] + _ASIC_GAP)
                        placements.append((r, c, 0))
                    else:  # sensor 391 x 185: the lying sensor turned by 90 degrees, so its
                        # fast axis points up and ASIC 0 sits below ASIC 1
                        r = r_block + (1 - asic) * (ASIC_SHAPE[1] + _ASIC_GAP)
                        c = c_block + sensor * (ASIC_SHAPE[0] + _SENSOR_GAP)
                        placements.append((r, c, 1))
    return placements


def _rotate_placement(row0, col0, k):
    """Placement of the same ASIC after np.rot90 of the whole assembled frame."""
    h, w = _placed_shape(k)
    n = ASSEMBLED_SHAPE[1]
    # np.rot90 sends frame pixel (r, c) to (n - 1 - c, r)
    return (n - col0 - w, row0, (k + 1) % 4)


def asic_placements():
    """(64, 3) int array of (row0, col0, k): ASIC i occupies np.rot90(asic, k) at (row0, col0)."""
    row_offset = CENTRE_PIXEL[0] - _HOLE_ROWS - _QUADRANT
    col_offset = CENTRE_PIXEL[1] - _HOLE_COLS - _QUADRANT
    quadrant = [(r + row_offset, c + col_offset, k) for r, c, k in _quadrant0_placements()]
    placements = []
    for _ in range(4):
        placements.extend(quadrant)
        quadrant = [_rotate_placement(*p) for p in quadrant]
    return np.array(placements, dtype=np.int64)


def _check_asics(asics):
    asics = np.asarray(asics)
    if asics.shape != (N_ASICS,) + ASIC_SHAPE:
        raise ValueError(f"expected CSPAD ASICs of shape {(N_ASICS,) + ASIC_SHAPE}, got {asics.shape}")
    return asics


def assemble(asics):
    """Paste the (64, 185, 194) ASIC stack into the 1765 x 1765 frame; pixels outside ASICs are 0."""
    asics = _check_asics(asics)
    frame = np.zeros(ASSEMBLED_SHAPE, dtype=asics.dtype)
    for asic, (row0, col0, k) in zip(asics, asic_placements()):
        h, w = _placed_shape(k)
        frame[row0 : row0 + h, col0 : col0 + w] = np.rot90(asic, k)
    return frame


def disassemble(image):
    """Cut the 1765 x 1765 frame back into the (64, 185, 194) ASIC stack (inverse of assemble)."""
    image = np.asarray(image)
    if image.shape != ASSEMBLED_SHAPE:
        raise ValueError(f"expected an assembled CSPAD image of shape {ASSEMBLED_SHAPE}, got {image.shape}")
    asics = np.empty((N_ASICS,) + ASIC_SHAPE, dtype=image.dtype)
    for i, (row0, col0, k) in enumerate(asic_placements()):
        h, w = _placed_shape(k)
        asics[i] = np.rot90(image[row0 : row0 + h, col0 : col0 + w], -k)
    return asics


def active_areas():
    """Flat list, 4 ints per ASIC, in the cctbx.xfel / idh5 ACTIVE_AREAS convention.

    Each tile is ``x1, y1, x2, y2`` with x the SLOW (row) index and y the FAST (column) index,
    upper-left corner inclusive and lower-right exclusive, as cctbx's tile managers and the
    fv5080 reader (``flex.grid(x2 - x1, y2 - y1)`` pasted at ``(x1, y1)``) use them.
    """
    tiles = []
    for row0, col0, k in asic_placements():
        h, w = _placed_shape(k)
        tiles.extend([int(row0), int(col0), int(row0 + h), int(col0 + w)])
    return tiles


def asic_pixel_mask():
    """Boolean (1765, 1765) mask, True on pixels that belong to an ASIC."""
    return assemble(np.ones((N_ASICS,) + ASIC_SHAPE, dtype=bool))


def asic_border_pixels():
    """Boolean (1765, 1765) mask of the pixel lines where the two ASICs of each 2x1 sensor meet.

    On the real CSPAD these edge pixels are wider and collect extra signal: the line next to the gap
    on each of the two ASICs, i.e. a double line per sensor.
    """
    border = np.zeros((N_ASICS,) + ASIC_SHAPE, dtype=bool)
    border[0::2, :, -1] = True  # first ASIC of a sensor: its last fast column touches the gap
    border[1::2, :, 0] = True  # second ASIC: its first fast column
    return assemble(border)


def asic_frame_transform(i, placements=None):
    """Map ASIC i's continuous pixel coordinates to assembled-frame ones.

    Returns ``(origin, fast, slow)`` as (row, col) vectors in the assembled frame: the ASIC corner
    (slow=0, fast=0) lands at ``origin``, and one pixel along its fast / slow axis moves by ``fast`` /
    ``slow``. Used to build the lab-frame geometry of the 64-panel detector.
    """
    row0, col0, k = asic_placements()[i]
    origin = np.array([0.0, 0.0])
    fast = np.array([0.0, 1.0])
    slow = np.array([1.0, 0.0])
    h, w = ASIC_SHAPE
    for _ in range(k):
        # np.rot90 (counter-clockwise) sends the continuous point (y, x) of an h x w array to
        # (w - x, y) of the w x h result; directions (dy, dx) go to (-dx, dy)
        origin = np.array([w - origin[1], origin[0]])
        fast = np.array([-fast[1], fast[0]])
        slow = np.array([-slow[1], slow[0]])
        h, w = w, h
    return origin + np.array([row0, col0], dtype=float), fast, slow
