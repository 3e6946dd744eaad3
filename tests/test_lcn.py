"""The fast LCN against a slow, obviously correct reference (REFERENCE §5)."""

import numpy as np
import pytest
import torch

from dials_cnn.lcn import local_contrast_normalise


def reference_zscore(image, min_std=0.0):
    x = np.asarray(image, dtype=np.float64)
    std = x.std()
    return (x - x.mean()) / max(std if std > 0 else 1.0, min_std)


def reference_lcn(image, window=5, std_floor=1.0, min_std=0.0):
    """Global z-score (dividing by at least ``min_std``), then each pixel minus the mean of its
    reflect-padded window, over max(window std, std_floor) — one window at a time, in float64."""
    z = reference_zscore(image, min_std)
    half = window // 2
    padded = np.pad(z, half, mode="reflect")
    out = np.empty_like(z)
    for row in range(z.shape[0]):
        for col in range(z.shape[1]):
            patch = padded[row : row + window, col : col + window]
            out[row, col] = (z[row, col] - patch.mean()) / max(patch.std(), std_floor)
    return out


def detector_like(shape, seed):
    """Poisson background, a few saturated Bragg-like pixels, a zero gap and a masked stripe."""
    rng = np.random.default_rng(seed)
    image = rng.poisson(3.0, shape).astype(np.float32)
    image[rng.integers(0, shape[0], 6), rng.integers(0, shape[1], 6)] = 65535
    image[:, shape[1] // 3] = 0
    image[shape[0] // 2 : shape[0] // 2 + 2, :] = 0
    return image


@pytest.mark.parametrize("shape,seed", [((37, 53), 0), ((64, 64), 1), ((9, 120), 2)])
def test_fast_lcn_matches_reference(shape, seed):
    image = detector_like(shape, seed)
    fast = local_contrast_normalise(image)
    assert fast.dtype == np.float32 and fast.shape == image.shape
    np.testing.assert_allclose(fast, reference_lcn(image), rtol=0, atol=1e-5)


def test_other_windows_and_floor_match_reference():
    image = np.random.default_rng(5).gamma(2.0, 10.0, (30, 41)).astype(np.float32)
    for window, floor in ((3, 1.0), (7, 0.5)):
        np.testing.assert_allclose(
            local_contrast_normalise(image, window=window, std_floor=floor),
            reference_lcn(image, window, floor), atol=1e-5, rtol=0,
        )


def test_batch_is_per_image():
    images = np.stack([detector_like((24, 31), seed) for seed in range(3)])
    batch = local_contrast_normalise(images)
    for k in range(3):
        np.testing.assert_allclose(batch[k], reference_lcn(images[k]), atol=1e-5, rtol=0)


def test_float64_path_matches_too():
    image = detector_like((40, 40), 7)
    np.testing.assert_allclose(
        local_contrast_normalise(image, dtype=torch.float64), reference_lcn(image), atol=1e-6, rtol=0
    )


def test_constant_image_has_no_contrast():
    assert np.all(local_contrast_normalise(np.full((16, 16), 7.0)) == 0)


def test_std_floor_keeps_flat_background_unamplified():
    # In a flat region the local std is below the floor: the output is just the z-score difference.
    image = np.zeros((20, 20), np.float32)
    image[10, 10] = 100.0
    out = local_contrast_normalise(image)
    assert out[10, 10] == pytest.approx(reference_lcn(image)[10, 10], abs=1e-5)
    assert out[10, 10] > 3  # the isolated spot stands out
    assert np.abs(out[0:4, 0:4]).max() < 1e-6  # far from the spot: nothing


def test_rejects_wrong_dimensions():
    with pytest.raises(ValueError, match="2-D image"):
        local_contrast_normalise(np.zeros(10))


def reference_block_lcn(image, block, window_blocks, std_floor=1.0, min_std=0.0):
    """LCN of every native pixel over the pixels of the window_blocks x window_blocks blocks around its
    block (blocks reflect-padded), then the maximum per block — pixel by pixel, in float64."""
    z = reference_zscore(image, min_std)
    rows, cols = z.shape[0] // block, z.shape[1] // block
    blocks = z.reshape(rows, block, cols, block).transpose(0, 2, 1, 3)  # (rows, cols, block, block)
    half = window_blocks // 2
    padded = np.pad(blocks, ((half, half), (half, half), (0, 0), (0, 0)), mode="reflect")
    out = np.empty((rows, cols))
    for row in range(rows):
        for col in range(cols):
            window = padded[row : row + window_blocks, col : col + window_blocks]
            normalised = (blocks[row, col] - window.mean()) / max(window.std(), std_floor)
            out[row, col] = normalised.max()
    return out


BLOCK_LCN_IMPLEMENTATIONS = ("compiled", "torch")


def block_lcn(implementation):
    from dials_cnn import lcn, native

    if implementation == "torch":
        return lcn.block_lcn_torch
    # make env builds the compiled helper; without it the classification is 1.7x slower
    assert native.function("block_lcn_max") is not None, f"{native.LIBRARY} is missing: run make env"
    return lcn.block_lcn_max


@pytest.mark.parametrize("implementation", BLOCK_LCN_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape,block,window_blocks,floor", [((48, 64), 2, 5, 1.0), ((36, 60), 3, 3, 0.5),
                                                              ((64, 64), 2, 11, 1.0)])
def test_block_lcn_is_native_lcn_then_max_binning(shape, block, window_blocks, floor, implementation):
    image = (detector_like(shape, 7) + 1000.0).astype(np.float32)  # a pedestal: the variance must not cancel
    fast = block_lcn(implementation)(torch.from_numpy(image), block, window_blocks, floor).numpy()
    assert fast.shape == (shape[0] // block, shape[1] // block)
    np.testing.assert_allclose(fast, reference_block_lcn(image, block, window_blocks, floor), rtol=0, atol=1e-4)


def test_compiled_block_lcn_is_the_torch_one_on_a_detector_cut():
    """A 1024^2 cut (a strided view of a larger image, as the classification passes it) with
    saturated pixels and a zero-filled gap: the two implementations agree to float32 rounding."""
    from dials_cnn.lcn import block_lcn_torch

    rng = np.random.default_rng(4)
    image = rng.poisson(2.0, size=(1100, 1200)).astype(np.float32)
    image[rng.integers(0, 1100, 50), rng.integers(0, 1200, 50)] = 65535.0
    image[:, 600:620] = 0.0
    cut = torch.from_numpy(image)[30:1054, 100:1124]
    assert not cut.is_contiguous()
    compiled = block_lcn("compiled")(cut, 2, 11)
    np.testing.assert_allclose(compiled.numpy(), block_lcn_torch(cut, 2, 11).numpy(), rtol=1e-5, atol=1e-5)


def sparse_photon_counts(shape, seed, rate=0.01):
    """A photon-counting image: 1 % of the pixels hold a photon, a Bragg spot of 12 photons."""
    rng = np.random.default_rng(seed)
    image = rng.poisson(rate, shape).astype(np.float32)
    image[20:22, 30:32] = [[5, 3], [3, 1]]
    return image


def test_zscore_floor_matches_reference_and_calms_single_photons():
    """With the divisor floored at one count a stray photon no longer stands as high as a spot; where
    the image's std is above the floor nothing changes."""
    image = sparse_photon_counts((64, 64), 3)
    floored = local_contrast_normalise(image, window=11, min_std=1.0)
    np.testing.assert_allclose(floored, reference_lcn(image, 11, min_std=1.0), rtol=0, atol=1e-5)
    plain = local_contrast_normalise(image, window=11)
    photons = (image == 1) & (np.arange(64)[:, None] > 30)  # far from the spot
    assert plain[photons].min() > 0.6 * plain[20, 30]  # a photon looks nearly like the spot's peak
    assert floored[photons].max() < 0.3 * floored[20, 30]
    busy = detector_like((48, 64), 7)
    np.testing.assert_array_equal(local_contrast_normalise(busy, min_std=1.0), local_contrast_normalise(busy))


@pytest.mark.parametrize("implementation", BLOCK_LCN_IMPLEMENTATIONS)
def test_block_lcn_floors_the_global_std_like_the_reference(implementation):
    image = sparse_photon_counts((64, 64), 5)
    fast = block_lcn(implementation)(torch.from_numpy(image), 2, 11, 1.0, 1.0).numpy()
    np.testing.assert_allclose(fast, reference_block_lcn(image, 2, 11, 1.0, 1.0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("implementation", BLOCK_LCN_IMPLEMENTATIONS)
def test_block_lcn_rejects_what_it_cannot_honour(implementation):
    block_lcn_max = block_lcn(implementation)
    with pytest.raises(ValueError, match="multiples of 2"):
        block_lcn_max(torch.zeros(5, 8), 2, 3)
    with pytest.raises(ValueError, match="odd number"):
        block_lcn_max(torch.zeros(8, 8), 2, 4)
    with pytest.raises(ValueError, match="needs more than 5 blocks"):
        block_lcn_max(torch.zeros(10, 10), 2, 11)
