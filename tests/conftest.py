"""Fixtures that write small (and a few full-size) files with the project's own writers."""

import numpy as np
import pytest

from dials_cnn import cspad, layouts

BACKGROUND = 10  # mean photons per pixel of the Poisson background
SPOT_HEIGHT = 3000  # added to each pixel of a painted 3 x 3 spot


def paint_spots(image, centres, height=SPOT_HEIGHT):
    """Add 3 x 3 bright spots centred on (row, col) pixels of a 2-D array, in place."""
    for row, col in centres:
        image[row - 1 : row + 2, col - 1 : col + 2] += height
    return image


def noisy(shape, seed):
    return np.random.default_rng(seed).poisson(BACKGROUND, shape).astype(np.int32)


class Written:
    """A file written for a test, with what was written into it."""

    def __init__(self, path, **facts):
        self.path = str(path)
        self.__dict__.update(facts)


# Small idh5 file: 2 tiles, 5 images over 3 chunks, distance and wavelength differing per image
SMALL_SHAPE = (40, 56)
SMALL_TILES = [2, 3, 18, 27, 22, 29, 38, 53]  # x = slow (row), y = fast (col); lower-right exclusive


@pytest.fixture(scope="session")
def small_idh5(tmp_path_factory):
    path = tmp_path_factory.mktemp("idh5") / "small.h5"
    images = [noisy(SMALL_SHAPE, seed) for seed in range(5)]
    distances = [100.0, 101.5, 103.0, 104.5, 106.0]
    wavelengths = [1.30, 1.31, 1.32, 1.33, 1.34]
    with layouts.Idh5Writer(
        path,
        image_shape=SMALL_SHAPE,
        pixel_size_mm=0.11,
        beam_center_mm=(3.3, 2.2),
        min_trusted_value=-10,
        saturated_value=60000,
        active_areas=SMALL_TILES,
        chunk_size=2,
    ) as writer:
        for image, d, w in zip(images, distances, wavelengths):
            writer.append(image, d, w, timestamp=f"2015{d}")
    return Written(path, images=images, distances=distances, wavelengths=wavelengths, beam=(3.3, 2.2))


#: beam through the centre of the centre pixel (882, 882): (fast, slow) mm
CSPAD_BEAM_MM = tuple((centre + 0.5) * cspad.PIXEL_SIZE_MM for centre in cspad.CENTRE_PIXEL[::-1])
#: (ASIC, slow, fast) of the spots painted on the first raw CSPAD shot
CSPAD_SPOTS = [(3, 60, 50), (17, 100, 120), (30, 40, 150), (38, 140, 90), (45, 92, 97), (61, 20, 30)]


@pytest.fixture(scope="session")
def cspad_shots():
    """Two raw CSPAD shots (64 ASICs each): the first with six spots, the second none."""
    with_spots = noisy((cspad.N_ASICS,) + cspad.ASIC_SHAPE, 11)
    for asic, slow, fast in CSPAD_SPOTS:
        paint_spots(with_spots[asic], [(slow, fast)])
    return [with_spots, noisy((cspad.N_ASICS,) + cspad.ASIC_SHAPE, 12)]


@pytest.fixture(scope="session")
def raw_cspad(tmp_path_factory, cspad_shots):
    path = tmp_path_factory.mktemp("raw") / "raw_cspad.h5"
    with layouts.RawCspadWriter(
        path, beam_center_mm=CSPAD_BEAM_MM, min_trusted_value=-10, saturated_value=65535, chunk_size=1
    ) as writer:
        writer.append(cspad_shots[0], 120.0, 1.27, timestamp="20130213015500123")
        writer.append(cspad_shots[1], 121.0, 1.28)
    return Written(path, shots=cspad_shots, distances=[120.0, 121.0], wavelengths=[1.27, 1.28])


@pytest.fixture(scope="session")
def cspad_idh5(tmp_path_factory, cspad_shots):
    """The same two CSPAD shots, assembled into 1765 x 1765 idh5 images as in CXIDB id-76."""
    path = tmp_path_factory.mktemp("cxidb") / "cspad_idh5.h5"
    images = [cspad.assemble(shot) for shot in cspad_shots]
    with layouts.Idh5Writer(
        path,
        image_shape=cspad.ASSEMBLED_SHAPE,
        pixel_size_mm=cspad.PIXEL_SIZE_MM,
        beam_center_mm=CSPAD_BEAM_MM,
        min_trusted_value=-10,
        saturated_value=65535,
        active_areas=cspad.active_areas(),
        chunk_size=1,
    ) as writer:
        writer.append(images[0], 120.0, 1.27)
        writer.append(images[1], 121.0, 1.28)
    return Written(path, images=images, distances=[120.0, 121.0], wavelengths=[1.27, 1.28])


RAYONIX_SHAPE = (1920, 1920)
RAYONIX_BEAM_MM = (84.48, 84.48)  # the centre of the 0.088 mm binned pixels grid
RAYONIX_HOLE_PX = 30
RAYONIX_SPOTS = [(300, 400), (700, 1500), (1200, 250), (1500, 1600), (900, 1100), (1800, 960)]


@pytest.fixture(scope="session")
def rayonix(tmp_path_factory):
    """Full-size hardware-binned Rayonix run: six spots on shot 0, none on shot 1; zeros in the hole."""
    path = tmp_path_factory.mktemp("rayonix") / "rayonix.h5"
    images = [paint_spots(noisy(RAYONIX_SHAPE, 21), RAYONIX_SPOTS), noisy(RAYONIX_SHAPE, 22)]
    centre = RAYONIX_BEAM_MM[0] / 0.088
    slow, fast = np.ogrid[: RAYONIX_SHAPE[0], : RAYONIX_SHAPE[1]]
    hole = (fast + 0.5 - centre) ** 2 + (slow + 0.5 - centre) ** 2 < RAYONIX_HOLE_PX**2
    for image in images:
        image[hole] = 0
    with layouts.BinnedRayonixWriter(
        path,
        beam_center_mm=RAYONIX_BEAM_MM,
        hole_radius_px=RAYONIX_HOLE_PX,
        min_trusted_value=-1,
        saturated_value=65535,
        chunk_size=1,
    ) as writer:
        writer.append(images[0], 150.0, 1.75)
        writer.append(images[1], 151.0, 1.76)
    return Written(path, images=images, distances=[150.0, 151.0], wavelengths=[1.75, 1.76], hole=hole)


@pytest.fixture(scope="session")
def small_rayonix(tmp_path_factory):
    """Small binned Rayonix file (binning 4) over three chunks."""
    path = tmp_path_factory.mktemp("rayonix_small") / "rayonix_small.h5"
    images = [noisy((48, 64), seed) for seed in range(5)]
    with layouts.BinnedRayonixWriter(
        path,
        binning=4,
        image_shape=(48, 64),
        beam_center_mm=(32 * 0.176, 24 * 0.176),
        hole_radius_px=5,
        min_trusted_value=-1,
        saturated_value=65535,
        chunk_size=2,
    ) as writer:
        for i, image in enumerate(images):
            writer.append(image, 200.0 + i, 1.0 + 0.01 * i)
    return Written(path, images=images, distances=[200.0 + i for i in range(5)])
