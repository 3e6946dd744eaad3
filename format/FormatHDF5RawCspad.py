"""dxtbx reader for raw CSPAD stills (layout ``dials_cnn_raw_cspad_v1``): one panel per ASIC.

Each of the 64 panels is an ASIC in its native (185 slow x 194 fast) orientation, placed in the lab
frame where ``dials_cnn.cspad.assemble`` pastes it in the monolithic 1765 x 1765 array; that array is
laid out like the idh5 reader's flat panel (fast +x, slow -y, beam centre from the metadata), so a
pixel has the same lab position in both readings.
"""

import numpy as np

from dxtbx.model import Detector
from scitbx.array_family import flex

from dials_cnn import cspad, layouts
from dials_cnn.format.FormatHDF5CXIDB76 import FormatHDF5Layout


def asic_panel_name(i):
    return "CSPAD ASIC %02d (quadrant %d, sensor %d, asic %d)" % (i, i // 16, (i % 16) // 2, i % 2)


class FormatHDF5RawCspad(FormatHDF5Layout):
    layout_version = layouts.RAW_CSPAD_VERSION

    @staticmethod
    def understand(image_file):
        return layouts.understands(image_file, layouts.RAW_CSPAD_VERSION)

    def _detector_at(self, distance_mm):
        pixel = float(self._metadata("PIXEL_SIZE"))
        beam_x, beam_y = self._beam_centre_mm()
        placements = np.asarray(self._metadata("ASIC_PLACEMENTS")).reshape(-1, 3)
        slow_size, fast_size = self._layout.pixel_shape[1:]

        def lab(row, col):  # assembled-frame (row, col) in pixels -> lab mm
            return (col * pixel - beam_x, beam_y - row * pixel, -distance_mm)

        def direction(d_row, d_col):
            return (d_col, -d_row, 0.0)

        detector = Detector()
        for i in range(len(placements)):
            origin, fast, slow = cspad.asic_frame_transform(i, placements)
            panel = detector.add_panel()
            panel.set_type("SENSOR_PAD")
            panel.set_name(asic_panel_name(i))
            panel.set_frame(direction(*fast), direction(*slow), lab(*origin))
            panel.set_pixel_size((pixel, pixel))
            panel.set_image_size((int(fast_size), int(slow_size)))
            panel.set_trusted_range(self._trusted_range())
        return detector

    def get_raw_data(self, index=None):
        asics = self._image_pixels(index)
        return tuple(flex.int(np.ascontiguousarray(asic)) for asic in asics)

    def get_assembled_image(self, index=None):
        """The 1765 x 1765 monolithic array of shot ``index``, as the paper's files hold it."""
        return cspad.assemble(self._image_pixels(index))

    def _mask_array(self):
        # the outermost pixel of every ASIC is unreliable, as in the idh5 ACTIVE_AREAS mask
        good = np.zeros(self._layout.pixel_shape[1:], dtype=bool)
        good[1:-1, 1:-1] = True
        return tuple(good for _ in range(self._layout.pixel_shape[0]))
