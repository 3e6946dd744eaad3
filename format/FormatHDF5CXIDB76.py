"""dxtbx reader for the paper's CXIDB id-76 files (layout ``idh5_v1.0``), CSPAD or Rayonix.

Also home of ``FormatHDF5Layout``, the abstract base that the project's other HDF5 readers
(FormatHDF5RawCspad, FormatHDF5BinnedRayonix) share: chunked multi-image stills with a distance and
a wavelength per shot, checked through ``dials_cnn.layouts.LayoutFile``.
"""

import numpy as np

from dxtbx.format.Format import abstract
from dxtbx.format.FormatHDF5 import FormatHDF5
from dxtbx.format.FormatStill import FormatStill
from scitbx.array_family import flex

from dials_cnn import layouts


@abstract
class FormatHDF5Layout(FormatHDF5, FormatStill):
    """Multi-image still reader for the layouts of dials_cnn.layouts; subclasses set
    ``layout_version`` and build the detector for one distance."""

    layout_version = None

    def _start(self):
        # Raises LayoutError naming the file if the file changed since understand()
        self._layout = layouts.open_layout(self._image_file, self.layout_version)
        self._detectors_by_distance = {}
        self._beams_by_wavelength = {}
        self._static_mask = None

    def _index(self, index):
        index = 0 if index is None else int(index)
        self._layout.locate(index)  # ImageIndexError naming the file when out of range
        return index

    def _metadata(self, name):
        return self._layout.metadata[name]

    def _trusted_range(self):
        return (float(self._metadata("MIN_TRUSTED_VALUE")), float(self._metadata("SATURATED_VALUE")))

    def _beam_centre_mm(self):
        return (float(self._metadata("BEAM_CENTER_X")), float(self._metadata("BEAM_CENTER_Y")))

    def _detector_at(self, distance_mm):
        raise NotImplementedError

    def _flat_panel(self, distance_mm, sensor, name):
        """One flat panel normal to the beam, fast +x, slow -y, as the idh5 metadata describe it."""
        pixel = float(self._metadata("PIXEL_SIZE"))
        detector = self._detector_factory.simple(
            sensor=sensor,
            distance=distance_mm,
            beam_centre=self._beam_centre_mm(),
            fast_direction="+x",
            slow_direction="-y",
            pixel_size=(pixel, pixel),
            image_size=(int(self._metadata("SIZE1")), int(self._metadata("SIZE2"))),
            trusted_range=self._trusted_range(),
            mask=[],
        )
        detector[0].set_name(name)
        return detector

    def _detector(self, index=None):
        distance = float(self._layout.distances[self._index(index)])
        # shots at the same distance share one model, so .expt files stay small
        if distance not in self._detectors_by_distance:
            self._detectors_by_distance[distance] = self._detector_at(distance)
        return self._detectors_by_distance[distance]

    def _beam(self, index=None):
        wavelength = float(self._layout.wavelengths[self._index(index)])
        if wavelength not in self._beams_by_wavelength:
            self._beams_by_wavelength[wavelength] = self._beam_factory.simple(wavelength)
        return self._beams_by_wavelength[wavelength]

    def get_detector(self, index=None):
        return self._detector(index)

    def get_beam(self, index=None):
        return self._beam(index)

    def get_num_images(self):
        return self._layout.n_images

    def get_image_file(self, index=None):
        return self._image_file

    def get_timestamp_string(self, index=None):
        return self._layout.timestamps[self._index(index)]

    def _image_pixels(self, index):
        return self._layout.read_pixels(self._index(index))

    def get_raw_data(self, index=None):
        return flex.int(self._image_pixels(index))

    def _mask_array(self):
        """numpy bool array(s) of good pixels, or None for no static mask."""
        return None

    def get_static_mask(self):
        # dxtbx 3.11 hands this to ImageSet masks (DIALS spot finding, imageset.get_mask)
        if self._static_mask is None:
            # one mask per unchanged file (the layout is shared), not one per still
            key = ("static_mask", type(self))
            if key not in self._layout.derived:
                masks = self._mask_array()
                self._layout.derived[key] = None if masks is None else tuple(
                    flex.bool(np.ascontiguousarray(m)) for m in masks)
            self._static_mask = self._layout.derived[key]
        return self._static_mask


def flat_panel_name(layout_file):
    """Name telling CSPAD from Rayonix for the idh5 runs, which do not name their detector."""
    meta = layout_file.metadata
    tiles = len(np.asarray(meta["ACTIVE_AREAS"]).reshape(-1)) // 4
    if tiles > 1:
        return "CSPAD (assembled)"
    return "Rayonix MX170-HS (binned)" if int(meta["SIZE1"]) == 1920 else "idh5 panel"


class FormatHDF5CXIDB76(FormatHDF5Layout):
    """CXIDB id-76 ``idh5_v1.0``: one flat panel, fast +x, slow -y; mask = ACTIVE_AREAS shrunk by
    one pixel (only when there is more than one tile), AND-ed by DIALS with the trusted range."""

    layout_version = layouts.IDH5_VERSION

    @staticmethod
    def understand(image_file):
        return layouts.understands(image_file, layouts.IDH5_VERSION)

    def _detector_at(self, distance_mm):
        name = flat_panel_name(self._layout)
        return self._flat_panel(distance_mm, "CCD" if name.startswith("Rayonix") else "PAD", name)

    def _mask_array(self):
        tiles = np.asarray(self._metadata("ACTIVE_AREAS"), dtype=np.int64).reshape(-1, 4)
        if len(tiles) <= 1:
            return None
        rows, cols = self._layout.pixel_shape
        good = np.zeros((rows, cols), dtype=bool)
        margin = 1  # the outermost pixels of each ASIC are unreliable
        for slow1, fast1, slow2, fast2 in tiles:  # cctbx convention: x = slow, y = fast
            good[max(slow1 + margin, 0) : slow2 - margin, max(fast1 + margin, 0) : fast2 - margin] = True
        return (good,)
