"""dxtbx reader for hardware-binned Rayonix stills (layout ``dials_cnn_binned_rayonix_v1``)."""

import numpy as np

from dials_cnn import layouts
from dials_cnn.format.FormatHDF5CXIDB76 import FormatHDF5Layout


class FormatHDF5BinnedRayonix(FormatHDF5Layout):
    """One flat CCD panel, fast +x, slow -y; pixel size = native size x binning (as written);
    the central beam hole (HOLE_RADIUS binned pixels around the beam centre) is masked."""

    layout_version = layouts.BINNED_RAYONIX_VERSION

    @staticmethod
    def understand(image_file):
        return layouts.understands(image_file, layouts.BINNED_RAYONIX_VERSION)

    def _pixel_size(self):
        return float(self._metadata("PIXEL_SIZE"))

    def _detector_at(self, distance_mm):
        binning = int(self._metadata("BINNING"))
        return self._flat_panel(distance_mm, "CCD", f"{self._metadata('DETECTOR')} binned {binning}x{binning}")

    def _mask_array(self):
        rows, cols = self._layout.pixel_shape
        pixel = self._pixel_size()
        beam_x, beam_y = (v / pixel for v in self._beam_centre_mm())  # in pixels: fast, slow
        slow, fast = np.ogrid[:rows, :cols]
        # pixel centres sit at index + 0.5 in dxtbx pixel coordinates
        radius2 = (fast + 0.5 - beam_x) ** 2 + (slow + 0.5 - beam_y) ** 2
        return (radius2 >= float(self._metadata("HOLE_RADIUS")) ** 2,)
