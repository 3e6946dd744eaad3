"""Network architectures and the model file.

Architectures (``ARCHITECTURES``, by name):

``ke2018``: the paper's network exactly (REFERENCE §5): conv 7x7/2 -> 4, BN, ReLU, maxpool 3/2 (ceil);
three times [conv 3x3/2 -> 8/16/32, BN, ReLU, maxpool 2 (ceil)]; flatten 288 -> linear 3 -> log-softmax;
He init. It needs a 720x720 input (32x3x3 = 288 features).

``spotnet``: the project's own. No max-pool before the spots have been seen: a strided 5x5 conv then
3x3 convs, wider first layers, and global average + max pooling (batch-normalised), so the head sees
"how many spot-like responses, anywhere": it accepts any input size and is robust to crop and
detector changes.

The model file is ONE ``torch.save`` of plain types and tensors (loaded with ``weights_only=True``):
format name and version, architecture and its kwargs, state_dict, preprocessing parameters, class
names, training provenance and test metrics.
"""

import math
import os

import torch
import torch.nn as nn

from dials_cnn.preprocess import PreprocessError, PreprocessParams

CLASS_NAMES = ("HIT", "MAYBE", "MISS")
MODEL_FORMAT = "dials_cnn.model"
MODEL_FORMAT_VERSION = 1


class ModelError(ValueError):
    """A model file that cannot be used: the message names the file and what to do."""


def _he_init(module):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Ke2018(nn.Module):
    def __init__(self, n_classes=3, widths=(4, 8, 16, 32), features=288):
        super().__init__()
        layers = [
            nn.Conv2d(1, widths[0], 7, stride=2, padding=3),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, ceil_mode=True),
        ]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.Conv2d(w_in, w_out, 3, stride=2, padding=1),
                nn.BatchNorm2d(w_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(features, n_classes)
        _he_init(self)

    def forward(self, x):
        x = self.features(x)
        return torch.log_softmax(self.classifier(torch.flatten(x, 1)), dim=1)


class SpotNet(nn.Module):
    def __init__(self, n_classes=3, widths=(8, 16, 32, 32), first_kernel=5):
        super().__init__()
        layers = [
            nn.Conv2d(1, widths[0], first_kernel, stride=2, padding=first_kernel // 2, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [
                nn.Conv2d(w_in, w_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(w_out),
                nn.ReLU(inplace=True),
            ]
        layers += [
            nn.Conv2d(widths[-1], widths[-1], 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(inplace=True),
        ]
        self.features = nn.Sequential(*layers)
        # The maximum over a whole image of a spot detector's response is large and spiky; normalising
        # the pooled features and starting from a zero classifier (uniform probabilities) keeps the
        # first epochs stable at the paper's learning rates.
        self.pooled_norm = nn.BatchNorm1d(2 * widths[-1])
        self.classifier = nn.Linear(2 * widths[-1], n_classes)
        _he_init(self)
        nn.init.zeros_(self.classifier.weight)

    def forward(self, x):
        x = self.features(x)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return torch.log_softmax(self.classifier(self.pooled_norm(pooled)), dim=1)


class SpotCounter(nn.Module):
    """Counts Bragg spots, then applies the expert's rule to the count.

    A fully convolutional spot detector gives the probability that a visible spot is centred in each
    ``stride`` x ``stride`` cell of the input (trained densely on simulated spot maps,
    :mod:`dials_cnn.spot_targets`). Their sum over the expert's window (and over the whole input) is the
    expected number of spots; the class logits are linear in log(1 + count), initialised to the expert's
    thresholds (HIT >= 10, MAYBE 4-9), so P(HIT), P(MAYBE), P(MISS) follow the count the way the
    expert's labels do. No pooling before the cell level: a one-pixel spot is seen at full contrast.

    ``window``: the expert's window in input pixels relative to the beam (x from, x to, y from, y to;
    +y is down the image, the beam at the lower centre). ``input_size``: the side of the input it takes.
    ``dilations``: the 3 x 3 context layers on the cell grid; each of dilation d widens the receptive field
    by 16 d input pixels (one, d = 2: 48 px; (2, 4): 112 px, enough to see that a jet streak goes on).
    ``separable``: each context layer is a depthwise 3 x 3 convolution followed by a 1 x 1 one (the same
    receptive field, 1/7 of the multiply-adds: the two full context layers are 62 % of the network's).
    """

    stride = 8

    def __init__(self, n_classes=3, widths=(8, 16, 32), input_size=512, window=(-236.25, 236.25, -221.0, 39.0),
                 dilations=(2,), separable=False):
        super().__init__()
        w1, w2, w3 = widths
        self.window_bounds = tuple(float(v) for v in window)

        def block(w_in, w_out, kernel, stride, padding, dilation=1, groups=1):
            return [nn.Conv2d(w_in, w_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                              bias=False),
                    nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]

        # receptive field 4, 8, 16 input pixels, then + 16 d per context layer: a spot and its surroundings
        if separable:
            context = [layer for d in dilations
                       for layer in block(w3, w3, 3, 1, d, d, groups=w3) + block(w3, w3, 1, 1, 0)]
        else:
            context = [layer for d in dilations for layer in block(w3, w3, 3, 1, d, d)]
        self.features = nn.Sequential(
            *block(1, w1, 4, 2, 1), *block(w1, w2, 3, 2, 1), *block(w2, w3, 3, 2, 1), *context
        )
        self.spot_logits = nn.Conv2d(w3, 1, 1)
        self.classifier = nn.Linear(3, n_classes)
        _he_init(self)
        nn.init.normal_(self.spot_logits.weight, std=0.01)
        nn.init.constant_(self.spot_logits.bias, -6.0)  # a spot in few cells: start near zero counts
        with torch.no_grad():  # the expert's rule in log(1 + count) of the window: HIT >= 10, MISS < 4
            self.classifier.weight.copy_(torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-4.0, 0.0, 0.0]]))
            self.classifier.bias.copy_(torch.tensor([-4.0 * math.log(10.5), 0.0, 4.0 * math.log(4.5)]))
        cells = input_size // self.stride
        self.register_buffer("window", self.window_mask(cells), persistent=False)

    def window_mask(self, cells):
        """(cells, cells) float mask of the window for a beam-centred input of ``cells * stride`` pixels."""
        centres = (torch.arange(cells, dtype=torch.float32) + 0.5) * self.stride - cells * self.stride / 2.0
        x0, x1, y0, y1 = self.window_bounds
        inside_x = (centres >= x0) & (centres < x1)
        inside_y = (centres >= y0) & (centres < y1)
        return (inside_y[:, None] & inside_x[None, :]).float()

    def spot_map(self, x):
        """Logits (B, 1, H / stride, W / stride) that a visible spot is centred in each cell."""
        return self.spot_logits(self.features(x))

    @staticmethod
    def _count(probability, floor):
        """Spots counted from cell probabilities above ``floor``: thousands of empty cells at a
        probability of 0.002 would otherwise add up to a few phantom spots on every image."""
        return torch.relu(probability - floor) * (1.0 / (1.0 - floor))

    def counts(self, logits, window):
        """(B, 3): expected spots in the window (cells above 5 % and above 30 %) and in the whole input."""
        probability = torch.sigmoid(logits)
        loose, strict = self._count(probability, 0.05), self._count(probability, 0.3)
        return torch.stack([(loose * window).sum(dim=(1, 2, 3)), (strict * window).sum(dim=(1, 2, 3)),
                            loose.sum(dim=(1, 2, 3))], dim=1)

    def classify(self, logits, window):
        """Log-probabilities from spot logits and a window mask (H', W') or (B, 1, H', W')."""
        return torch.log_softmax(self.classifier(torch.log1p(self.counts(logits, window))), dim=1)

    def forward(self, x):
        return self.classify(self.spot_map(x), self.window)

    def forward_train(self, x, window):
        """(log-probabilities, spot logits) with a per-image ``window`` (B, 1, H', W') that follows the
        augmentation of each image."""
        logits = self.spot_map(x)
        return self.classify(logits, window), logits

    def expected_spots(self, x):
        """Expected number of visible spots in the window of each beam-centred input (B,)."""
        return self.counts(self.spot_map(x), self.window)[:, 0]


ARCHITECTURES = {"ke2018": Ke2018, "spotnet": SpotNet, "spotcount": SpotCounter}


def expert_window_in_input(preprocess):
    """The expert's inspection window (945 x 520 native pixels, beam at its lower centre, as the
    simulator labels stills) in input pixels relative to the beam, as :class:`SpotCounter` takes it."""
    from dials_cnn.presets import Preset
    from dials_cnn.spot_targets import native_pixels_per_input_pixel

    width, height = Preset.window_px
    scale = native_pixels_per_input_pixel(preprocess)
    above = Preset.window_beam_fraction * height
    return (-width / 2 / scale, width / 2 / scale, -above / scale, (height - above) / scale)


def architecture_defaults(architecture, preprocess):
    """Keyword arguments that fit an architecture to a preprocessing (input size, expert window)."""
    if architecture == "spotcount":
        return {"input_size": preprocess.crop, "window": list(expert_window_in_input(preprocess))}
    return {}


def build_network(architecture, **kwargs):
    try:
        factory = ARCHITECTURES[architecture]
    except KeyError:
        raise ModelError(
            f"unknown architecture {architecture!r} (known: {', '.join(sorted(ARCHITECTURES))})"
        ) from None
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return factory(**kwargs)


def check_input_size(network, crop, where="this model"):
    """Raise :class:`ModelError` if ``network`` cannot take a (1, crop, crop) input."""
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            network(torch.zeros(1, 1, crop, crop))
    except RuntimeError as error:
        raise ModelError(
            f"{where}: the network does not accept the {crop}x{crop} input of its preprocessing "
            f"({str(error).splitlines()[0]})"
        ) from None
    finally:
        network.train(was_training)


class ScreeningModel:
    """A network with everything needed to use it: preprocessing, class names, provenance."""

    def __init__(self, network, architecture, architecture_kwargs, preprocess, class_names=CLASS_NAMES,
                 provenance=None, metrics=None, path=None):
        self.network = network
        self.architecture = architecture
        self.architecture_kwargs = dict(architecture_kwargs or {})
        self.preprocess = preprocess
        self.class_names = tuple(class_names)
        self.provenance = dict(provenance or {})
        self.metrics = dict(metrics or {})
        self.path = path

    def __repr__(self):
        return f"ScreeningModel({self.architecture}, {self.preprocess}, from {self.path})"


def _plain(value):
    """Convert tuples and numpy scalars to what ``weights_only`` loading accepts and JSON can show."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, str):
        return str(value)  # e.g. torch.__version__ is a str subclass that weights_only refuses
    return value


def save_model(path, network, architecture, preprocess, architecture_kwargs=None, class_names=CLASS_NAMES,
               provenance=None, metrics=None):
    """Write the model file atomically."""
    from dials_cnn.fileio import atomic_path

    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "architecture": architecture,
        "architecture_kwargs": _plain(architecture_kwargs or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
        "preprocess": _plain(preprocess.to_dict()),
        "class_names": list(class_names),
        "provenance": _plain(provenance or {}),
        "metrics": _plain(metrics or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path):
    """Read a model file; a wrong file, another format version or unusable preprocessing -> ModelError."""
    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"Model file {path} does not exist; pass model=<file written by dials.cnn_train>") from None
    except Exception as error:
        raise ModelError(
            f"{path} is not a dials_cnn model file (cannot be read: {str(error).splitlines()[0][:200]}); "
            "pass a model written by dials.cnn_train"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path} is not a dials_cnn model file; pass a model written by dials.cnn_train")
    version = payload.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise ModelError(
            f"{path} is a dials_cnn model of format version {version}, this dials_cnn reads version "
            f"{MODEL_FORMAT_VERSION}; retrain it with this version's dials.cnn_train"
        )
    try:
        preprocess = PreprocessParams.from_dict(payload["preprocess"])
    except (PreprocessError, TypeError) as error:
        raise ModelError(f"{path}: incompatible preprocessing: {error}; retrain the model with this version") from None
    class_names = tuple(payload.get("class_names", ()))
    if class_names != CLASS_NAMES:
        raise ModelError(f"{path}: classes {class_names} are not {CLASS_NAMES}")
    try:
        network = build_network(payload["architecture"], **payload.get("architecture_kwargs", {}))
        network.load_state_dict(payload["state_dict"])
    except ModelError as error:
        raise ModelError(f"{path}: {error}") from None
    except (RuntimeError, TypeError, KeyError) as error:
        raise ModelError(f"{path}: weights do not fit the architecture ({str(error).splitlines()[0][:200]})") from None
    check_input_size(network, preprocess.crop, where=path)
    network.eval()
    return ScreeningModel(
        network, payload["architecture"], payload.get("architecture_kwargs", {}), preprocess, class_names,
        payload.get("provenance", {}), payload.get("metrics", {}), path,
    )
