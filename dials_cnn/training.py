"""Training: the paper's recipe (REFERENCE §5) on inputs held in memory, augmented per batch.

Inputs are preprocessed ONCE (:func:`dials_cnn.preprocess.prepare_many` with ``margin`` = the largest
shift) into a :class:`DataSet`; each batch is drawn class-balanced (a class uniformly, then an image of
it; with groups, a group uniformly, then a class present in it, then an image), geometrically augmented
(:class:`~dials_cnn.augment.GeometricAugment`) and fed to SGD. Every epoch reports train and validation
loss/accuracy, writes a checkpoint (resumable), and the best-validation weights are kept.
"""

import dataclasses
import json
import logging
import math
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

import dials_cnn
from dials_cnn.augment import GeometricAugment, centre_crops
from dials_cnn.decision import hit_decisions
from dials_cnn.fileio import atomic_path
from dials_cnn.memory import keep_freed_memory
from dials_cnn.model import CLASS_NAMES, ScreeningModel, build_network, check_input_size, save_model
from dials_cnn.spot_targets import SPOT

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "dials_cnn.checkpoint"


class TrainingError(ValueError):
    """Training cannot start or resume (empty class, mismatched checkpoint, ...)."""


@dataclasses.dataclass
class TrainingRecipe:
    """Defaults are the paper's: SGD momentum 0.9, weight decay 5e-4, batch 64, 100 batches per epoch,
    120 epochs, learning rate 0.1 -> 1e-4 exponentially, class-balanced batches, +-120 px shifts."""

    epochs: int = 120
    batches_per_epoch: int = 100
    batch_size: int = 64
    lr_start: float = 0.1
    lr_end: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_shift: int = 120
    flips: bool = True
    rot90: bool = True
    balance: str = "class"  # "class", "group_class" (needs groups) or "none"
    keep: str = "best"  # "best" (lowest validation loss) or "last" epoch's weights
    eval_batch_size: int = 32
    # with spot maps (simulated stills) and a counting network: weight of the per-cell spot loss,
    # summed over an image's cells, against the per-image class loss
    spot_weight: float = 0.05
    # largest gradient norm per step (None: unclipped, the paper's recipe); a counting network's
    # summed spot loss can otherwise throw the first steps at high learning rates far off
    max_grad_norm: float = None

    def learning_rate(self, epoch):
        """Learning rate of ``epoch`` (1-based): 10^-(1 + 3 (e-1)/(E-1)) for the paper's defaults."""
        if self.epochs <= 1:
            return self.lr_start
        fraction = (epoch - 1) / (self.epochs - 1)
        return float(self.lr_start * (self.lr_end / self.lr_start) ** fraction)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)


@dataclasses.dataclass
class DataSet:
    """Preprocessed inputs (N, S, S) — S may exceed the crop to allow shifts — with int labels
    (indices into ``CLASS_NAMES``), optional group ids (e.g. preset names) and image names, and
    optionally dense spot maps (N, S / stride, S / stride) of :mod:`dials_cnn.spot_targets`."""

    inputs: np.ndarray
    labels: np.ndarray
    groups: np.ndarray = None
    names: list = None
    spot_maps: np.ndarray = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.inputs.ndim != 3 or len(self.inputs) != len(self.labels):
            raise TrainingError(f"inputs {self.inputs.shape} and {len(self.labels)} labels do not match")
        if self.groups is not None:
            self.groups = np.asarray(self.groups)

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        return DataSet(
            self.inputs[indices], self.labels[indices],
            None if self.groups is None else self.groups[indices],
            None if self.names is None else [self.names[i] for i in indices],
            None if self.spot_maps is None else self.spot_maps[indices],
        )


@dataclasses.dataclass
class TrainingResult:
    model: ScreeningModel
    history: list  # one dict per epoch
    metrics: dict  # validation (and test) metrics of the kept weights


def split_indices(n, fractions=(0.5, 0.2, 0.3), seed=0, sequential=False):
    """Indices of the train/validation/test split (a seeded permutation, or in order as fv5080)."""
    order = np.arange(n) if sequential else np.random.default_rng(seed).permutation(n)
    total = float(sum(fractions))
    n_train = int(round(n * fractions[0] / total))
    n_val = int(round(n * fractions[1] / total))
    return np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_val]), np.sort(order[n_train + n_val :])


class BalancedSampler:
    """Draws image indices: a group uniformly (if grouped), then a class present there, then an image."""

    def __init__(self, dataset, balance):
        labels = dataset.labels
        if balance == "none":
            self.pools = [[np.arange(len(labels))]]
        else:
            if balance == "group_class":
                if dataset.groups is None:
                    raise TrainingError("balance=group_class needs group ids in the training set")
                groups = [dataset.groups == g for g in np.unique(dataset.groups)]
            elif balance == "class":
                groups = [np.ones(len(labels), bool)]
            else:
                raise TrainingError(f"unknown balance {balance!r} (class, group_class or none)")
            self.pools = []
            for in_group in groups:
                pools = [np.flatnonzero(in_group & (labels == c)) for c in range(len(CLASS_NAMES))]
                self.pools.append([p for p in pools if len(p)])
        if not any(self.pools):
            raise TrainingError("the training set is empty")

    def draw(self, size, rng):
        out = np.empty(size, dtype=np.int64)
        for k in range(size):
            group = self.pools[rng.integers(len(self.pools))]
            pool = group[rng.integers(len(group))]
            out[k] = pool[rng.integers(len(pool))]
        return out


def _as_input(crops):
    """(B, 1, H, W) tensor of crops (B, H, W) in channels-last layout, the one oneDNN's CPU convolutions
    run fastest in (training steps 1.5x faster than in the default layout; the network must be in it too)."""
    return torch.from_numpy(crops)[:, None].contiguous(memory_format=torch.channels_last)


def predict_inputs(network, inputs, crop, batch_size=32):
    """Class probabilities (N, 3) of the beam-centred crops of preprocessed ``inputs``."""
    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            batch = centre_crops(inputs, np.arange(start, min(start + batch_size, len(inputs))), crop)
            out.append(network(_as_input(batch)).exp().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)), np.float32)


def classification_metrics(probabilities, labels, threshold=0.5):
    """Loss, 3-class accuracy, confusion matrix, and the paper's Hit+Maybe recall / Miss specificity."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return {"n": 0}
    p = np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((3, 3), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    hit = hit_decisions(probabilities, threshold)
    positive = labels != CLASS_NAMES.index("MISS")
    return {
        "n": int(len(labels)),
        "loss": float(-np.log(p).mean()),
        "accuracy": float((predicted == labels).mean()),
        "hit_maybe_recall": float(hit[positive].mean()) if positive.any() else None,
        "miss_specificity": float((~hit[~positive]).mean()) if (~positive).any() else None,
        "confusion_true_by_predicted": confusion.tolist(),
    }


def _provenance(architecture, architecture_kwargs, preprocess, recipe, seed, train_set, val_set, extra):
    def describe(dataset):
        counts = np.bincount(dataset.labels, minlength=3).tolist()
        return {"n": len(dataset), "class_counts": dict(zip(CLASS_NAMES, counts))}

    record = {
        "architecture": architecture,
        "architecture_kwargs": architecture_kwargs,
        "preprocess": preprocess.to_dict(),
        "recipe": recipe.to_dict(),
        "seed": seed,
        "train": describe(train_set),
        "validation": describe(val_set),
        "versions": {
            "dials_cnn": dials_cnn.__version__,
            "torch": str(torch.__version__),
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    record.update(extra or {})
    return record


def _save_checkpoint(path, payload):
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path, expected):
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TrainingError(f"cannot resume from checkpoint {path}: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a dials_cnn training checkpoint")
    for key, value in expected.items():
        if payload.get(key) != value:
            raise TrainingError(
                f"checkpoint {path} was written with a different {key} ({payload.get(key)!r} != {value!r}); "
                "remove it or run without resume"
            )
    return payload


def _format_seconds(seconds):
    seconds = int(max(seconds, 0))
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def train(train_set, val_set, architecture="ke2018", architecture_kwargs=None, preprocess=None,
          recipe=None, seed=0, checkpoint=None, resume=False, init_model=None, test_set=None,
          output=None, curve_png=None, provenance=None, num_threads=None, log=None):
    """Train a network and return a :class:`TrainingResult`.

    ``train_set``/``val_set``/``test_set``: :class:`DataSet` prepared with ``preprocess`` (their side
    minus the crop, halved, bounds the shifts). ``init_model``: a :class:`ScreeningModel` (or its path)
    to fine-tune. ``checkpoint``: file written every epoch; with ``resume`` training continues from it.
    ``output``: model file to write; ``curve_png``: training-curve plot. ``log``: a callable taking one
    line (default: this module's logger). Deterministic for a given seed and thread count.
    """
    from dials_cnn.model import load_model
    from dials_cnn.preprocess import KE2018

    preprocess = preprocess or KE2018
    recipe = recipe or TrainingRecipe()
    architecture_kwargs = dict(architecture_kwargs or {})
    log = log or logger.info
    if num_threads:
        torch.set_num_threads(num_threads)
    keep_freed_memory()  # a step's activations are reused, not page-faulted in again (memory.py)
    if len(val_set) == 0:
        raise TrainingError("the validation set is empty")
    for name, dataset in (("training", train_set), ("validation", val_set), ("test", test_set)):
        if dataset is not None and dataset.inputs.shape[-1] < preprocess.crop:
            raise TrainingError(f"{name} inputs ({dataset.inputs.shape[-1]} px) are smaller than the crop")

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if init_model is not None:
        if not isinstance(init_model, ScreeningModel):
            init_model = load_model(init_model)
        if init_model.preprocess != preprocess:
            raise TrainingError(
                f"init_model {init_model.path} was trained with preprocessing {init_model.preprocess}, "
                f"not {preprocess}"
            )
        architecture, architecture_kwargs = init_model.architecture, init_model.architecture_kwargs
        network = build_network(architecture, **architecture_kwargs)
        network.load_state_dict(init_model.network.state_dict())
    else:
        network = build_network(architecture, **architecture_kwargs)
    check_input_size(network, preprocess.crop, where=f"architecture {architecture}")
    network = network.to(memory_format=torch.channels_last)  # see _as_input
    optimiser = torch.optim.SGD(network.parameters(), lr=recipe.learning_rate(1), momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    sampler = BalancedSampler(train_set, recipe.balance)
    augment = GeometricAugment(recipe.max_shift, recipe.flips, recipe.rot90)
    dense = train_set.spot_maps is not None and hasattr(network, "forward_train")
    if dense:
        stride = network.stride
        if train_set.inputs.shape[-1] != train_set.spot_maps.shape[-1] * stride:
            raise TrainingError(f"spot maps {train_set.spot_maps.shape[1:]} do not fit inputs "
                                f"{train_set.inputs.shape[1:]} at the network's stride {stride}")
        full_window = network.window_mask(train_set.spot_maps.shape[-1]).numpy()
        log(f"Dense spot supervision: {train_set.spot_maps.shape[-1]}^2 cells of {stride} px per image")
    history = []
    best = (math.inf, None, 0)  # validation loss, state_dict, epoch
    first_epoch = 1
    identity = {"architecture": architecture, "preprocess": preprocess.to_dict(), "recipe": recipe.to_dict(),
                "seed": seed}
    if resume and checkpoint and os.path.exists(checkpoint):
        state = _load_checkpoint(checkpoint, identity)
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimiser"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = json.loads(state["numpy_rng"])
        history = json.loads(state["history"])
        best = (state["best_loss"], state["best_state"], state["best_epoch"])
        first_epoch = state["epoch"] + 1
        log(f"Resuming from {checkpoint} after epoch {state['epoch']}")

    images_per_epoch = recipe.batches_per_epoch * recipe.batch_size
    started = time.time()
    for epoch in range(first_epoch, recipe.epochs + 1):
        epoch_start = time.time()
        lr = recipe.learning_rate(epoch)
        for group in optimiser.param_groups:
            group["lr"] = lr
        network.train()
        loss_sum, correct = 0.0, 0
        for _ in range(recipe.batches_per_epoch):
            indices = sampler.draw(recipe.batch_size, rng)
            target = torch.from_numpy(train_set.labels[indices])
            optimiser.zero_grad(set_to_none=True)
            if dense:
                crops, maps, windows = augment.crops_with_maps(
                    train_set.inputs, train_set.spot_maps, full_window, indices, preprocess.crop, stride, rng)
                output_log, spot_logits = network.forward_train(_as_input(crops), torch.from_numpy(windows)[:, None])
                maps = torch.from_numpy(maps)[:, None]
                spot_loss = F.binary_cross_entropy_with_logits(
                    spot_logits, (maps == SPOT).float(), reduction="sum")
                loss = F.nll_loss(output_log, target) + recipe.spot_weight * spot_loss / len(indices)
            else:
                batch = _as_input(augment.crops(train_set.inputs, indices, preprocess.crop, rng))
                output_log = network(batch)
                loss = F.nll_loss(output_log, target)
            loss.backward()
            if recipe.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(network.parameters(), recipe.max_grad_norm)
            optimiser.step()
            loss_sum += float(loss.detach()) * len(indices)
            correct += int((output_log.argmax(1) == target).sum())
        val = classification_metrics(predict_inputs(network, val_set.inputs, preprocess.crop,
                                                    recipe.eval_batch_size), val_set.labels)
        elapsed = time.time() - epoch_start
        record = {
            "epoch": epoch, "lr": lr,
            "train_loss": loss_sum / images_per_epoch, "train_accuracy": correct / images_per_epoch,
            "val_loss": val["loss"], "val_accuracy": val["accuracy"],
            "val_hit_maybe_recall": val["hit_maybe_recall"], "val_miss_specificity": val["miss_specificity"],
            "seconds": elapsed,
        }
        history.append(record)
        if val["loss"] < best[0] or recipe.keep == "last":
            best = (val["loss"], {k: v.detach().clone() for k, v in network.state_dict().items()}, epoch)
        done = epoch - first_epoch + 1
        eta = (time.time() - started) / done * (recipe.epochs - epoch)
        log(
            f"epoch {epoch}/{recipe.epochs} lr {lr:.2g} | train loss {record['train_loss']:.3f} "
            f"acc {record['train_accuracy']:.3f} | val loss {val['loss']:.3f} acc {val['accuracy']:.3f} | "
            f"{images_per_epoch / max(elapsed, 1e-9):.0f} images/s, ETA {_format_seconds(eta)}"
        )
        if checkpoint:
            _save_checkpoint(checkpoint, dict(
                identity, format=CHECKPOINT_FORMAT, epoch=epoch, network=network.state_dict(),
                optimiser=optimiser.state_dict(), torch_rng=torch.get_rng_state(),
                numpy_rng=json.dumps(rng.bit_generator.state), history=json.dumps(history),
                best_loss=best[0], best_state=best[1], best_epoch=best[2],
            ))

    if best[1] is not None:
        network.load_state_dict(best[1])
    network.eval()
    metrics = {"kept_epoch": best[2]}
    metrics["validation"] = classification_metrics(
        predict_inputs(network, val_set.inputs, preprocess.crop, recipe.eval_batch_size), val_set.labels)
    if test_set is not None and len(test_set):
        metrics["test"] = classification_metrics(
            predict_inputs(network, test_set.inputs, preprocess.crop, recipe.eval_batch_size), test_set.labels)
    record = _provenance(architecture, architecture_kwargs, preprocess, recipe, seed, train_set, val_set,
                         provenance)
    if init_model is not None:
        record["init_model"] = str(init_model.path)
    model = ScreeningModel(network, architecture, architecture_kwargs, preprocess, CLASS_NAMES, record,
                           metrics, output)
    if output:
        save_model(output, network, architecture, preprocess, architecture_kwargs, CLASS_NAMES, record, metrics)
    if curve_png:
        plot_training_curve(history, curve_png)
    return TrainingResult(model, history, metrics)


def plot_training_curve(history, path):
    """Loss and accuracy per epoch (train and validation) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(9, 3.5))
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [h["train_loss"] for h in history], label="train")
    loss_axes.plot(epochs, [h["val_loss"] for h in history], label="validation")
    loss_axes.set(xlabel="epoch", ylabel="loss (NLL)")
    loss_axes.legend()
    accuracy_axes.plot(epochs, [h["train_accuracy"] for h in history], label="train")
    accuracy_axes.plot(epochs, [h["val_accuracy"] for h in history], label="validation")
    accuracy_axes.set(xlabel="epoch", ylabel="3-class accuracy", ylim=(0, 1))
    accuracy_axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
