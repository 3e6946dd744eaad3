"""The embedded default model: shipped, self-describing, and far better than chance on stills it never saw."""

import os

import numpy as np
import pytest

from dials_cnn import default_model
from dials_cnn.model import CLASS_NAMES, load_model
from dials_cnn.preprocess import prepare
from dials_cnn.projection import flat_from_array
from dials_cnn.simulate import simulate_image
from dials_cnn.training import classification_metrics, predict_inputs

# Seeds never used by `make default-model` (it draws from seed * 1000 + small numbers, seed 2018).
UNSEEN_SEED = 424242
# Held-out balanced accuracy of the shipped model is 0.85-1.0 on these presets (README);
# 36 stills give a standard error of ~0.07, so 0.70 fails a broken model, not an unlucky draw.
BALANCED_ACCURACY_FLOOR = 0.70


@pytest.fixture(scope="module")
def model():
    assert os.path.exists(default_model.DEFAULT_MODEL_PATH), "run `make default-model` to build it"
    return load_model(default_model.DEFAULT_MODEL_PATH)


@pytest.mark.parametrize("name", sorted(default_model.SHIPPED_MODELS))
def test_the_shipped_models_are_small_and_describe_themselves(name):
    """The default and the fast model: the same recipe but for the context layers."""
    path = default_model.shipped_model_path(name)
    assert os.path.exists(path), f"run `make default-model` / `make fast-model` to build {path}"
    assert os.path.getsize(path) < 512 * 1024
    model = load_model(path)
    assert model.architecture == "spotcount"
    recipe = default_model.RECIPES[name]
    assert tuple(model.architecture_kwargs["dilations"]) == recipe["dilations"]
    assert bool(model.architecture_kwargs.get("separable", False)) == recipe["separable"]
    assert model.preprocess == default_model.default_preprocess()
    assert tuple(model.class_names) == CLASS_NAMES
    held_out = model.metrics["held_out_by_source"]
    for preset in default_model.PRESET_NAMES:
        assert f"source:{preset}" in held_out
    assert "simulated" in model.provenance["data"]


@pytest.mark.parametrize("preset", ["LN84", "LO19", "LG36"])
def test_unseen_stills_are_screened_far_above_chance(model, preset):
    n = 36
    inputs, labels = [], []
    for index in range(n):
        still = simulate_image(preset, UNSEEN_SEED, index, vary_beam_centre=True)
        flat = flat_from_array(still.image, still.beam_centre_px, still.pixel_size_mm, still.mask)
        inputs.append(prepare(flat, model.preprocess))
        labels.append(CLASS_NAMES.index(still.truth["label"]))
    probabilities = predict_inputs(model.network, np.stack(inputs), model.preprocess.crop)
    metrics = classification_metrics(probabilities, labels)
    positive = np.asarray(labels) != CLASS_NAMES.index("MISS")
    assert positive.any() and (~positive).any()
    # Balanced accuracy of the veto: 0.5 is chance.
    balanced = 0.5 * (metrics["hit_maybe_recall"] + metrics["miss_specificity"])
    assert balanced >= BALANCED_ACCURACY_FLOOR, metrics


def test_the_default_model_counts_the_visible_spots_of_unseen_stills(model):
    """Its expected spot count (in the expert's window) follows the simulator's visible-spot count."""
    import torch

    expected, true = [], []
    for preset in ("LO19", "LG36"):
        for index in range(16):
            still = simulate_image(preset, UNSEEN_SEED + 1, index, vary_beam_centre=True)
            flat = flat_from_array(still.image, still.beam_centre_px, still.pixel_size_mm, still.mask)
            with torch.no_grad():
                x = torch.from_numpy(prepare(flat, model.preprocess))[None, None]
                expected.append(float(model.network.expected_spots(x)))
            true.append(still.truth["n_visible_spots"])
    from scipy.stats import spearmanr

    assert spearmanr(true, expected).statistic > 0.6, list(zip(true, np.round(expected, 1)))  # measured 0.77
    empty = [e for e, t in zip(expected, true) if t == 0]
    assert empty and np.median(empty) < 2  # no phantom spots on empty images


def test_shipped_models_are_named_and_files_win(tmp_path, monkeypatch):
    """model=default / model=fast name the shipped files, unless a file of that name is where the
    user runs the command."""
    monkeypatch.chdir(tmp_path)
    assert default_model.shipped_model_path() == default_model.DEFAULT_MODEL_PATH
    assert default_model.shipped_model_path("default") == default_model.DEFAULT_MODEL_PATH
    assert default_model.shipped_model_path("fast") == default_model.FAST_MODEL_PATH
    assert default_model.shipped_model_path("endstation.pt") == "endstation.pt"
    (tmp_path / "fast").write_bytes(b"")
    assert default_model.shipped_model_path("fast") == "fast"
    (tmp_path / "default").mkdir()  # an output folder of that name is not a model file
    assert default_model.shipped_model_path("default") == default_model.DEFAULT_MODEL_PATH


def test_simulated_inputs_are_reused_only_for_the_same_recipe_and_simulator(tmp_path, monkeypatch):
    sources = [default_model.Source("LO19", False, 0, 2)]
    params = default_model.default_preprocess()
    logged = []
    first = default_model.simulate_inputs(sources, "test", 5, params, 0, 1, logged.append, cache=str(tmp_path))
    again = default_model.simulate_inputs(sources, "test", 5, params, 0, 1, logged.append, cache=str(tmp_path))
    assert any("reusing" in line for line in logged)
    assert np.array_equal(first.inputs, again.inputs) and list(first.labels) == list(again.labels)
    # after a change to the simulator's code the stills are drawn again, into a cache file of their own
    monkeypatch.setattr(default_model, "_simulator_fingerprint", lambda: "other simulator code")
    logged.clear()
    default_model.simulate_inputs(sources, "test", 5, params, 0, 1, logged.append, cache=str(tmp_path))
    assert not any("reusing" in line for line in logged)
    assert len(list(tmp_path.glob("test-*.npz"))) == 2
