"""Training: a short real run that learns, determinism, resume, the recipe's schedule and sampling."""

import numpy as np
import pytest
import torch

from dials_cnn.model import load_model
from dials_cnn.preprocess import PreprocessParams, prepare_many
from dials_cnn.projection import flat_from_array
from dials_cnn.training import (
    BalancedSampler, DataSet, TrainingError, TrainingRecipe, classification_metrics, split_indices, train,
)

PARAMS = PreprocessParams(pipeline="native", crop=48, bin=2)
MARGIN = 6


def spot_still(label, rng, size=128):
    """A small still: Poisson background and one-pixel Bragg-like spots, HIT >= 12, MAYBE 4-9, MISS <= 1."""
    image = rng.poisson(rng.uniform(1, 6), (size, size)).astype(np.float32)
    n = {0: rng.integers(12, 30), 1: rng.integers(4, 10), 2: rng.integers(0, 2)}[label]
    image[rng.integers(20, size - 20, n), rng.integers(20, size - 20, n)] += rng.uniform(40, 400, n)
    beam = (size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2))
    return flat_from_array(image, beam, 0.11)


@pytest.fixture(scope="module")
def spot_sets():
    rng = np.random.default_rng(0)
    labels = np.tile([0, 1, 2], 60)
    inputs = prepare_many([spot_still(label, rng) for label in labels], PARAMS, margin=MARGIN, dtype=np.float16)
    dataset = DataSet(inputs, labels, groups=np.arange(len(labels)) % 2)
    train_idx, val_idx, test_idx = split_indices(len(dataset), seed=1)
    return dataset.subset(train_idx), dataset.subset(val_idx), dataset.subset(test_idx)


QUICK = TrainingRecipe(epochs=6, batches_per_epoch=8, batch_size=24, lr_start=0.05, lr_end=0.005, max_shift=MARGIN)


def test_short_training_learns_far_above_chance(spot_sets, tmp_path):
    train_set, val_set, test_set = spot_sets
    lines = []
    torch.set_num_threads(1)
    result = train(train_set, val_set, architecture="spotnet", preprocess=PARAMS, recipe=QUICK, seed=0,
                   test_set=test_set, output=tmp_path / "m.pt", curve_png=tmp_path / "curve.png",
                   checkpoint=tmp_path / "ckpt", log=lines.append, provenance={"data": "spot stills"})
    test = result.metrics["test"]
    assert test["n"] == 54 and test["accuracy"] > 0.7  # chance: 1/3
    assert test["hit_maybe_recall"] > 0.8 and test["miss_specificity"] > 0.65
    assert len(result.history) == 6 and len(lines) == 6 and "images/s" in lines[0] and "ETA" in lines[0]
    model = load_model(tmp_path / "m.pt")
    assert model.provenance["data"] == "spot stills" and model.provenance["seed"] == 0
    assert model.provenance["recipe"]["epochs"] == 6 and model.provenance["versions"]["torch"]
    assert model.metrics["test"]["accuracy"] == pytest.approx(test["accuracy"])
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deterministic_for_a_seed(spot_sets, tmp_path):
    train_set, val_set, _ = spot_sets
    recipe = TrainingRecipe(epochs=3, batches_per_epoch=3, batch_size=8, lr_start=0.05, lr_end=0.01, max_shift=MARGIN)
    kwargs = dict(architecture="spotnet", preprocess=PARAMS, recipe=recipe, seed=5, log=lambda line: None)
    once = train(train_set, val_set, **kwargs)
    again = train(train_set, val_set, **kwargs)
    assert [h["train_loss"] for h in once.history] == [h["train_loss"] for h in again.history]
    checkpoint = tmp_path / "run.checkpoint"
    train(train_set, val_set, **kwargs, checkpoint=checkpoint)
    with pytest.raises(TrainingError, match="different seed"):
        train(train_set, val_set, **dict(kwargs, seed=6), checkpoint=checkpoint, resume=True)


def test_resume_continues_after_the_last_checkpointed_epoch(spot_sets, tmp_path):
    train_set, val_set, _ = spot_sets
    recipe = TrainingRecipe(epochs=3, batches_per_epoch=2, batch_size=8, lr_start=0.05, lr_end=0.01, max_shift=MARGIN)
    kwargs = dict(architecture="spotnet", preprocess=PARAMS, recipe=recipe, seed=2, log=lambda line: None)
    straight = train(train_set, val_set, **kwargs)
    checkpoint = tmp_path / "ckpt"

    class Interrupt(Exception):
        pass

    def stop_after_epoch_2(line):
        if line.startswith("epoch 2/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(train_set, val_set, **dict(kwargs, log=stop_after_epoch_2), checkpoint=checkpoint)
    # the log line of epoch 2 comes before its checkpoint: resume repeats epoch 2 from epoch 1's state
    lines = []
    resumed = train(train_set, val_set, **dict(kwargs, log=lines.append), checkpoint=checkpoint, resume=True)
    assert lines[0].startswith("Resuming") and "after epoch 1" in lines[0]
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in straight.history]


def test_fine_tuning_starts_from_the_given_weights(spot_sets, tmp_path):
    train_set, val_set, test_set = spot_sets
    base = train(train_set, val_set, architecture="spotnet", preprocess=PARAMS, recipe=QUICK, seed=0,
                 output=tmp_path / "base.pt", log=lambda line: None)
    tuned = train(train_set, val_set, preprocess=PARAMS, init_model=tmp_path / "base.pt", seed=1,
                  recipe=TrainingRecipe(epochs=1, batches_per_epoch=1, batch_size=4, lr_start=1e-6, lr_end=1e-6,
                                        max_shift=MARGIN), log=lambda line: None, test_set=test_set)
    assert tuned.model.architecture == "spotnet"
    assert tuned.metrics["test"]["accuracy"] == pytest.approx(base.model.metrics.get("test", {}).get(
        "accuracy", tuned.metrics["test"]["accuracy"]), abs=0.1)
    with pytest.raises(TrainingError, match="init_model"):
        train(train_set, val_set, preprocess=PreprocessParams(pipeline="native", crop=40, bin=2),
              init_model=tmp_path / "base.pt", recipe=QUICK, log=lambda line: None)


def test_papers_learning_rate_schedule():
    recipe = TrainingRecipe()
    assert (recipe.epochs, recipe.batches_per_epoch, recipe.batch_size) == (120, 100, 64)
    assert (recipe.momentum, recipe.weight_decay, recipe.max_shift) == (0.9, 5e-4, 120)
    for epoch in (1, 2, 60, 120):
        assert recipe.learning_rate(epoch) == pytest.approx(10 ** -(1 + 3 * (epoch - 1) / 119))


def test_split_and_balanced_sampling():
    train_idx, val_idx, test_idx = split_indices(100, seed=3)
    assert (len(train_idx), len(val_idx), len(test_idx)) == (50, 20, 30)
    assert sorted(np.concatenate([train_idx, val_idx, test_idx]).tolist()) == list(range(100))
    assert split_indices(10, sequential=True)[0].tolist() == [0, 1, 2, 3, 4]
    labels = np.array([0] * 5 + [1] * 15 + [2] * 80)
    dataset = DataSet(np.zeros((100, 2, 2), np.float16), labels, groups=np.repeat(["a", "b"], 50))
    drawn = labels[BalancedSampler(dataset, "class").draw(6000, np.random.default_rng(0))]
    assert np.allclose(np.bincount(drawn) / 6000, 1 / 3, atol=0.03)
    # by group then class: group "a" holds classes 0, 1, 2; group "b" only class 2
    drawn = BalancedSampler(dataset, "group_class").draw(6000, np.random.default_rng(0))
    assert np.mean(drawn >= 50) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(TrainingError, match="group ids"):
        BalancedSampler(DataSet(np.zeros((3, 2, 2)), [0, 1, 2]), "group_class")


def test_metrics_in_the_papers_terms():
    probabilities = np.array([[0.8, 0.1, 0.1], [0.1, 0.2, 0.7], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    metrics = classification_metrics(probabilities, [0, 1, 2, 2])
    assert metrics["hit_maybe_recall"] == 0.5 and metrics["miss_specificity"] == 0.5
    assert metrics["accuracy"] == 0.5
    assert metrics["confusion_true_by_predicted"] == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]


def test_counting_network_learns_from_spot_maps(tmp_path):
    """Dense supervision: the spot map of each still teaches spotcount where its spots are, and its
    expected count follows the true one on stills it never saw."""
    from dials_cnn.spot_targets import SPOT

    params = PreprocessParams(pipeline="native", crop=64, bin=2, lcn_window=9)
    margin, stride, size = 8, 8, 192
    rng = np.random.default_rng(4)

    def still_and_map(label):
        image = rng.poisson(rng.uniform(1, 6), (size, size)).astype(np.float32)
        n = {0: rng.integers(12, 25), 1: rng.integers(4, 10), 2: rng.integers(0, 2)}[label]
        beam = size / 2
        # spots where the beam-centred 64 px input (128 native px) sees them
        y, x = rng.integers(beam - 60, beam + 60, (2, n))
        image[y, x] += rng.uniform(60, 400, n)
        target = np.zeros(((params.crop + 2 * margin) // stride,) * 2, np.uint8)
        top = beam - (params.crop + 2 * margin)  # native pixels: the input spans 2 x (64 + 16)
        target[((y - top) // (2 * stride)).astype(int), ((x - top) // (2 * stride)).astype(int)] = SPOT
        return flat_from_array(image, (beam, beam), 0.11), target, n

    labels = np.tile([0, 1, 2], 50)
    made = [still_and_map(label) for label in labels]
    inputs = prepare_many([m[0] for m in made], params, margin=margin, dtype=np.float16)
    dataset = DataSet(inputs, labels, spot_maps=np.stack([m[1] for m in made]))
    counts = np.array([m[2] for m in made])
    train_idx, val_idx, test_idx = split_indices(len(dataset), seed=2)
    recipe = TrainingRecipe(epochs=6, batches_per_epoch=8, batch_size=16, lr_start=0.05, lr_end=0.005,
                            max_shift=margin)
    torch.set_num_threads(1)
    lines = []
    kwargs = {"input_size": params.crop, "window": [-32.0, 32.0, -32.0, 32.0]}  # all of the input
    result = train(dataset.subset(train_idx), dataset.subset(val_idx), architecture="spotcount",
                   architecture_kwargs=kwargs, preprocess=params, recipe=recipe, seed=0,
                   test_set=dataset.subset(test_idx), output=tmp_path / "count.pt", log=lines.append)
    assert any("Dense spot supervision" in line for line in lines)
    test = result.metrics["test"]
    assert test["accuracy"] > 0.7 and test["hit_maybe_recall"] > 0.8 and test["miss_specificity"] > 0.8, test
    network = load_model(tmp_path / "count.pt").network
    with torch.no_grad():
        centre = torch.from_numpy(np.asarray(inputs[test_idx, margin:-margin, margin:-margin], np.float32))
        expected = network.expected_spots(centre[:, None]).numpy()
    assert np.corrcoef(expected, counts[test_idx])[0, 1] > 0.8
