"""Architectures (the paper's, exactly) and the model file."""

import numpy as np
import pytest
import torch

from dials_cnn.decision import argmax_classes, decision_labels, hit_decisions, hit_probability, near_threshold_misses
from dials_cnn.model import (
    ARCHITECTURES, MODEL_FORMAT_VERSION, ModelError, build_network, load_model, save_model,
)
from dials_cnn.preprocess import KE2018, PreprocessParams


def test_ke2018_shapes_are_the_papers():
    network = build_network("ke2018").eval()
    shapes = []
    x = torch.zeros(1, 1, 720, 720)
    with torch.no_grad():
        for layer in network.features:
            x = layer(x)
            if isinstance(layer, torch.nn.MaxPool2d):
                shapes.append(tuple(x.shape[1:]))
        assert shapes == [(4, 180, 180), (8, 45, 45), (16, 12, 12), (32, 3, 3)]
        assert network.classifier.in_features == 288 and network.classifier.out_features == 3
        log_p = network(torch.randn(2, 1, 720, 720))
    assert log_p.shape == (2, 3)
    np.testing.assert_allclose(log_p.exp().sum(1).numpy(), 1, atol=1e-5)  # log-softmax
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((7, 7), (2, 2), (3, 3))] + [((3, 3), (2, 2), (1, 1))] * 3
    assert all(isinstance(m, torch.nn.MaxPool2d) and m.ceil_mode for m in network.features if "Pool" in type(m).__name__)


def test_ke2018_he_initialisation():
    torch.manual_seed(0)
    conv = build_network("ke2018").features[0]
    fan_in = 1 * 7 * 7
    assert conv.weight.std().item() == pytest.approx(np.sqrt(2 / fan_in), rel=0.3)


def test_spotnet_takes_any_input_size():
    network = build_network("spotnet").eval()
    with torch.no_grad():
        for side in (64, 360, 720):
            assert network(torch.zeros(1, 1, side, side)).shape == (1, 3)
    assert set(ARCHITECTURES) >= {"ke2018", "spotnet"}
    with pytest.raises(ModelError, match="unknown architecture"):
        build_network("resnet1000")


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.pt"
    params = PreprocessParams(pipeline="native", crop=64, bin=2)
    network = build_network("spotnet", widths=[4, 8, 8, 8])
    save_model(path, network, "spotnet", params, {"widths": [4, 8, 8, 8]}, provenance={"seed": np.int64(3)},
               metrics={"test": {"accuracy": np.float32(0.5)}})
    return path, network, params


def test_model_file_round_trip(saved):
    path, network, params = saved
    model = load_model(path)
    assert model.architecture == "spotnet" and model.preprocess == params
    assert model.provenance == {"seed": 3} and model.metrics["test"]["accuracy"] == 0.5
    assert model.class_names == ("HIT", "MAYBE", "MISS") and not model.network.training
    x = torch.randn(2, 1, 64, 64)
    network.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.network(x), network(x))
    payload = torch.load(path, weights_only=True)  # plain types and tensors only
    assert payload["format_version"] == MODEL_FORMAT_VERSION


def rewrite(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


def test_missing_and_foreign_files_are_named(tmp_path, saved):
    with pytest.raises(ModelError, match="nothing.pt does not exist"):
        load_model(tmp_path / "nothing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a model")
    with pytest.raises(ModelError, match="junk.pt is not a dials_cnn model file"):
        load_model(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ModelError, match="other.pt is not a dials_cnn model file"):
        load_model(other)


def test_other_format_version_is_refused(saved):
    path = saved[0]
    rewrite(path, format_version=MODEL_FORMAT_VERSION + 1)
    with pytest.raises(ModelError, match=r"model.pt is a dials_cnn model of format version 2.*retrain"):
        load_model(path)


def test_incompatible_preprocessing_is_refused(saved):
    path = saved[0]
    rewrite(path, preprocess=dict(KE2018.to_dict(), pipeline="sharpen"))
    with pytest.raises(ModelError, match="model.pt: incompatible preprocessing"):
        load_model(path)


def test_crop_the_network_cannot_take_is_refused(tmp_path):
    path = tmp_path / "ke.pt"
    save_model(path, build_network("ke2018"), "ke2018", PreprocessParams(crop=512))
    with pytest.raises(ModelError, match="does not accept the 512x512 input"):
        load_model(path)


def test_decisions():
    p = np.array([[0.3, 0.3, 0.4], [0.1, 0.1, 0.8], [0.0, 0.45, 0.55]])
    np.testing.assert_allclose(hit_probability(p), [0.6, 0.2, 0.45])
    assert hit_decisions(p).tolist() == [True, False, False]
    assert hit_decisions(p, threshold=0.4).tolist() == [True, False, True]
    assert decision_labels(p).tolist() == ["Hit", "Miss", "Miss"]
    assert argmax_classes(p).tolist() == ["MISS", "MISS", "MISS"]
    # vetoed within NEAR_THRESHOLD (0.2) below the threshold: the ones a lower threshold keeps first
    assert near_threshold_misses(p).tolist() == [False, False, True]
    assert near_threshold_misses(p, threshold=0.1).tolist() == [False, False, False]
    assert near_threshold_misses(p, threshold=0.7).tolist() == [True, False, False]


def test_spotcount_counts_spots_in_the_window_and_applies_the_experts_rule():
    network = build_network("spotcount", input_size=128, window=[-40.0, 40.0, -48.0, 8.0]).eval()
    assert network(torch.zeros(2, 1, 128, 128)).shape == (2, 3)
    window = network.window
    cells = 128 // network.stride
    assert window.shape == (cells, cells)
    # beam at the lower centre: the window reaches further above the beam (rows < centre) than below
    rows = torch.nonzero(window.sum(1)).flatten()
    assert cells // 2 - rows.min() > rows.max() - cells // 2
    # a spot map with n certain spots inside the window and none elsewhere: HIT >= 10, MAYBE 4-9, MISS < 4
    inside = torch.nonzero(window.flatten()).flatten()
    expected = {12: "HIT", 30: "HIT", 6: "MAYBE", 1: "MISS", 0: "MISS"}
    for n, label in expected.items():
        logits = torch.full((1, 1, cells, cells), -30.0)
        logits.view(-1)[inside[:n]] = 30.0
        log_p = network.classify(logits, window)
        assert ("HIT", "MAYBE", "MISS")[int(log_p.argmax())] == label, (n, log_p.exp())
    with pytest.raises(RuntimeError):  # the window is made for the input size it was built for
        network(torch.zeros(1, 1, 96, 96))


def test_spotcount_context_layers_widen_what_a_cell_sees():
    """The receptive field of a cell's spot logit: 48 input pixels with the default context layer,
    112 with dilations (2, 4), separable or not; measured from the gradient of one logit, not from the
    formula. Separable context layers hold a fraction of the weights."""

    def receptive_field(network):
        x = torch.randn(8, 1, 256, 256, requires_grad=True)  # random: every ReLU passes for some image
        network.spot_map(x)[:, 0, 16, 16].sum().backward()
        touched = torch.nonzero(x.grad[:, 0].abs().sum((0, 1))).flatten()
        return int(touched.max() - touched.min() + 1)

    torch.manual_seed(0)
    default = build_network("spotcount", input_size=256, window=[-40.0, 40.0, -48.0, 8.0]).eval()
    wider = build_network("spotcount", input_size=256, window=[-40.0, 40.0, -48.0, 8.0], dilations=[2, 4]).eval()
    assert receptive_field(default) == 48
    assert receptive_field(wider) == 112
    assert wider(torch.zeros(1, 1, 256, 256)).shape == (1, 3)
    separable = build_network("spotcount", input_size=256, window=[-40.0, 40.0, -48.0, 8.0], dilations=[2, 4],
                              separable=True).eval()
    assert receptive_field(separable) == 112

    def context_weights(network):
        return sum(m.weight.numel() for m in network.features if isinstance(m, torch.nn.Conv2d)
                   and m.in_channels == m.out_channels == 32)

    assert context_weights(separable) * 6 < context_weights(wider)
