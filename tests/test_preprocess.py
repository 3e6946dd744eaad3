"""Preprocessing pipelines and augmentation."""

import dataclasses

import numpy as np
import pytest

from dials_cnn.augment import GeometricAugment, PhotometricAugment, centre_crops
from dials_cnn.lcn import local_contrast_normalise
from dials_cnn.preprocess import KE2018, NATIVE, PreprocessError, PreprocessParams, prepare, prepare_many
from dials_cnn.projection import flat_from_array


def background(shape=(400, 400), seed=0, level=2.0):
    return np.random.default_rng(seed).poisson(level, shape).astype(np.float32)


def test_params_round_trip_and_validation():
    params = PreprocessParams(pipeline="native", crop=96, bin=2)
    assert PreprocessParams.from_dict(params.to_dict()) == params
    with pytest.raises(PreprocessError, match="unknown preprocessing pipeline"):
        PreprocessParams(pipeline="fancy")
    with pytest.raises(PreprocessError, match="unknown preprocessing parameter"):
        PreprocessParams.from_dict(dict(params.to_dict(), colour=True))
    with pytest.raises(PreprocessError, match="version"):
        PreprocessParams.from_dict(dict(params.to_dict(), version=99))


def test_paper_pipeline_shapes_and_beam_centring():
    image = background((1765, 1765))
    image[1000, 700] = 60000  # a bright spot: after the 960 resize it is at (1000, 700) * 960/1765
    flat = flat_from_array(image, beam_centre_px=(700.5, 1000.5))
    out = prepare(flat, KE2018)
    assert out.shape == (720, 720) and out.dtype == np.float32
    peak = np.unravel_index(np.argmax(out), out.shape)
    assert abs(peak[0] - 360) <= 1 and abs(peak[1] - 360) <= 1  # the crop is centred on the beam
    wide = prepare(flat, KE2018, margin=120)
    assert wide.shape == (960, 960)
    # the paper's LCN is over the whole resized image, so the centre of the wide input is the crop
    np.testing.assert_allclose(wide[120:840, 120:840], out, atol=1e-6)


def test_paper_pipeline_is_lcn_of_the_resized_image():
    image = background((240, 240), seed=1)
    params = PreprocessParams(image_size=120, crop=120)
    out = prepare(flat_from_array(image), params)
    resized = image.reshape(120, 2, 120, 2).mean(axis=(1, 3))  # bilinear 2:1 == 2x2 mean
    np.testing.assert_allclose(out, local_contrast_normalise(resized), atol=1e-5)


def test_native_pipeline_is_lcn_then_max_binning_around_the_beam():
    image = background((300, 300), seed=2)
    params = PreprocessParams(pipeline="native", crop=50, bin=2)
    flat = flat_from_array(image, beam_centre_px=(150.0, 140.0))
    out = prepare(flat, params)
    region = image[90:190, 100:200]  # 100 native pixels around (x 150, y 140)
    expected = local_contrast_normalise(region).reshape(50, 2, 50, 2).max(axis=(1, 3))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_block_pipeline_is_block_lcn_around_the_beam():
    from dials_cnn.lcn import block_lcn_max
    import torch

    image = background((300, 300), seed=2)
    params = PreprocessParams(pipeline="block", crop=50, bin=2, lcn_window=10)
    out = prepare(flat_from_array(image, beam_centre_px=(150.0, 140.0)), params)
    expected = block_lcn_max(torch.from_numpy(image[90:190, 100:200]), 2, 5).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # windows must be an odd number of blocks
    with pytest.raises(PreprocessError, match="odd number of 2-pixel blocks"):
        PreprocessParams(pipeline="block", bin=2, lcn_window=21)
    with pytest.raises(PreprocessError, match="odd number of 2-pixel blocks"):
        PreprocessParams(pipeline="block", bin=2, lcn_window=20)


def test_binned_pipeline_is_photon_sums_then_lcn():
    image = background((300, 300), seed=9)
    params = PreprocessParams(pipeline="binned", crop=50, bin=2)
    out = prepare(flat_from_array(image, beam_centre_px=(150.0, 140.0)), params)
    region = image[90:190, 100:200]
    expected = local_contrast_normalise(region.reshape(50, 2, 50, 2).sum(axis=(1, 3)))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # with pool: then max-binned, from a region twice as wide
    pooled = prepare(flat_from_array(image, beam_centre_px=(150.0, 140.0)),
                     PreprocessParams(pipeline="binned", crop=25, bin=2, pool=2))
    np.testing.assert_allclose(pooled, expected.reshape(25, 2, 25, 2).max(axis=(1, 3)), atol=1e-5)


def test_outside_the_detector_is_zero_before_lcn():
    image = background((100, 100), seed=3)
    params = PreprocessParams(pipeline="native", crop=100, bin=1)
    out = prepare(flat_from_array(image, beam_centre_px=(0.0, 50.0)), params)  # beam on the left edge
    padded = np.zeros((100, 100), np.float32)
    padded[:, 50:] = image[:, :50]
    np.testing.assert_allclose(out, local_contrast_normalise(padded), atol=1e-5)


def test_one_pixel_spots_survive_native_but_fade_at_the_paper_scale():
    # 30 faint one-pixel spots (CSPAD-like, L498): count output pixels brighter than anything the
    # same pipeline makes of the spot-free background.
    blank = background((1765, 1765), seed=4, level=20)
    rng = np.random.default_rng(5)
    image = blank.copy()
    image[rng.integers(700, 1060, 30), rng.integers(700, 1060, 30)] += 60
    visible = {}
    for params in (NATIVE, KE2018, PreprocessParams(pipeline="binned", bin=2),
                   PreprocessParams(pipeline="block", crop=720, bin=2, lcn_window=6)):
        noise_max = prepare(flat_from_array(blank, beam_centre_px=(882.5, 882.5)), params).max()
        out = prepare(flat_from_array(image, beam_centre_px=(882.5, 882.5)), params)
        visible[params.pipeline] = int((out > noise_max).sum())
    assert visible["native"] >= 25  # measured 28
    assert visible["block"] >= 25  # the same windows, aligned to the 2 x 2 blocks
    assert visible["ke2018"] <= 15  # measured 11
    assert visible["binned"] > visible["ke2018"]  # measured 17


def test_prepare_many_stacks_in_the_requested_dtype():
    flats = [flat_from_array(background((64, 64), seed=s)) for s in range(3)]
    params = PreprocessParams(pipeline="native", crop=16, bin=2)
    stack = prepare_many(flats, params, margin=4, dtype=np.float16)
    assert stack.shape == (3, 24, 24) and stack.dtype == np.float16
    np.testing.assert_allclose(stack[1], prepare(flats[1], params, margin=4), atol=2e-2, rtol=1e-3)


def test_photometric_augment_changes_counts_not_gaps():
    image = background((80, 80), seed=6, level=50)
    mask = np.ones(image.shape, bool)
    mask[:, 40:42] = False
    flat = flat_from_array(image, mask=mask)
    augment = PhotometricAugment(thinning_probability=1.0, thinning_fraction=(0.01, 0.01),
                                 background_probability=0.0, intensity_scale=(1.0, 1.0))
    thinned = augment.apply(flat, np.random.default_rng(0))
    assert thinned.data.mean() < 1.5  # a near-zero photon-counting background
    assert np.all(thinned.data[:, 40:42] == 0)
    noisy = PhotometricAugment(background_probability=1.0, background_level=(50, 50), thinning_probability=0.0,
                               intensity_scale=(1.0, 1.0)).apply(flat, np.random.default_rng(1))
    assert noisy.data[mask].mean() > image[mask].mean() + 5
    # deterministic for a seed
    a = PhotometricAugment().apply(flat, np.random.default_rng(7)).data
    b = PhotometricAugment().apply(flat, np.random.default_rng(7)).data
    np.testing.assert_array_equal(a, b)
    out = prepare(flat, PreprocessParams(pipeline="native", crop=40, bin=2), augment=PhotometricAugment(),
                  rng=np.random.default_rng(8))
    assert out.shape == (40, 40)


def test_geometric_augment_shifts_flips_rotates_within_margin():
    inputs = np.arange(2 * 12 * 12, dtype=np.float32).reshape(2, 12, 12)
    crops = GeometricAugment(max_shift=2).crops(inputs, [0, 1, 1], 8, np.random.default_rng(0))
    assert crops.shape == (3, 8, 8) and crops.dtype == np.float32
    # every crop is a dihedral transform of an 8x8 window within +-2 of the centre
    for crop, index in zip(crops, [0, 1, 1]):
        windows = [inputs[index, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        variants = [np.rot90(w, k) for w in windows for k in range(4)]
        variants += [np.rot90(w[:, ::-1], k) for w in windows for k in range(4)]
        assert any(np.array_equal(crop, v) for v in variants)
    np.testing.assert_array_equal(centre_crops(inputs, [1], 8)[0], inputs[1, 2:10, 2:10])
    plain = GeometricAugment(max_shift=0, flips=False, rot90=False).crops(inputs, [0], 8, np.random.default_rng(0))
    np.testing.assert_array_equal(plain[0], inputs[0, 2:10, 2:10])


def test_linear_contrast_is_the_global_zscore_alone():
    """The paper's Table 8 alternative to LCN: same cut and binning, no local normalisation."""
    image = background((300, 300), seed=11)
    image[140, 150] += 500.0
    for pipeline in ("native", "block", "binned"):
        lcn = PreprocessParams(pipeline=pipeline, crop=50, bin=2, lcn_window=10 if pipeline == "block" else 5)
        linear = PreprocessParams.from_dict(dict(lcn.to_dict(), contrast="linear"))
        out = prepare(flat_from_array(image, beam_centre_px=(150.0, 140.0)), linear)
        region = image[90:190, 100:200]
        if pipeline == "binned":
            region = region.reshape(50, 2, 50, 2).sum(axis=(1, 3))
        z = (region - region.mean()) / region.std()
        expected = z if pipeline == "binned" else z.reshape(50, 2, 50, 2).max(axis=(1, 3))
        np.testing.assert_allclose(out, expected, atol=1e-5)
        assert not np.allclose(out, prepare(flat_from_array(image, beam_centre_px=(150.0, 140.0)), lcn))
    with pytest.raises(PreprocessError, match="unknown contrast"):
        PreprocessParams(contrast="gamma")
    # model files written before the option existed read as LCN
    legacy = {k: v for k, v in PreprocessParams().to_dict().items() if k != "contrast"}
    assert PreprocessParams.from_dict(legacy).contrast == "lcn"


@pytest.mark.parametrize("pipeline", ["block", "native", "ke2018"])
def test_zscore_floor_reaches_every_pipeline(pipeline):
    """``zscore_min_std`` changes a sparse photon-counting image in every pipeline the same way as the
    LCN it calls; model files written before it existed keep the paper's z-score (no floor)."""
    rng = np.random.default_rng(2)
    image = rng.poisson(0.01, (300, 300)).astype(np.int32)
    flat = flat_from_array(image, beam_centre_px=(150.0, 150.0))
    window = 22 if pipeline == "block" else 21
    plain = PreprocessParams(pipeline=pipeline, crop=96, bin=2, image_size=200, lcn_window=window)
    floored = dataclasses.replace(plain, zscore_min_std=1.0)
    # a lone photon: about 10 global stds high without the floor, one count with it
    assert prepare(flat, plain).max() > 3.0 * prepare(flat, floored).max()
    legacy = {k: v for k, v in floored.to_dict().items() if k != "zscore_min_std"}
    assert PreprocessParams.from_dict(legacy) == plain
