"""The embedded default model: how it is made, and where it lives.

``make default-model`` (= ``python -m dials_cnn.default_model --model default``) rebuilds
``dials_cnn/data/default_model.pt`` from scratch on a 2-core machine in about an hour, and ``make fast-model``
(``--model fast``) ``fast_model.pt``, the same recipe with depthwise-separable context layers
(:data:`RECIPES`):

1. simulate stills in memory (no files): every preset of :mod:`dials_cnn.presets` plus randomised shots far
   beyond them (any detector family — CSPAD, Rayonix, Pilatus- and Eiger-like photon counters — energies,
   cells, gains, backgrounds and artefacts drawn at random), labelled by the expert rule;
2. preprocess each once (kept in memory as float16, with a margin for shift augmentation);
3. train with batches balanced by source and class;
4. test on held-out stills of every source drawn with another seed, and store those numbers in the model.

Per-image random generators (``simulate.image_rng(seed, index)``) make the data identical for any number of
worker processes; the training itself is deterministic for a given seed and thread count.

Labels and spot maps follow the simulator's truth, the *expected* visibility of each reflection. Trained
instead on the visibility measured on the drawn image (``Still.spots["visible_in_image"]``), the
previous recipe (one context layer, no z-score floor) did worse on the same 1650 held-out stills against
either labelling: ROC AUC of P(HIT) + P(MAYBE) 0.976 / 0.973 (image / expected labels) against
0.9805 / 0.979 (one run each).
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time

import numpy as np

from dials_cnn.memory import keep_freed_memory

DATA_DIRECTORY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_MODEL_PATH = os.path.join(DATA_DIRECTORY, "default_model.pt")
FAST_MODEL_PATH = os.path.join(DATA_DIRECTORY, "fast_model.pt")
# model=<name> in the commands: the models shipped in the package. "fast" is the same recipe with
# depthwise-separable context layers (the same 112 px receptive field): 5.7 against 9.1 ms of network per
# image, the same held-out AUC, fewer nanocrystal hits kept (docs/performance.md).
SHIPPED_MODELS = {"default": DEFAULT_MODEL_PATH, "fast": FAST_MODEL_PATH}
RECIPES = {"default": {"dilations": (2, 4), "separable": False}, "fast": {"dilations": (2, 4), "separable": True}}


def shipped_model_path(model=None):
    """The file of ``model``: a path as given, or a shipped model's name (None: "default"). A file of
    that name in the working directory wins; a folder of that name (e.g. an output folder) does not."""
    if model is None:
        return DEFAULT_MODEL_PATH
    if model in SHIPPED_MODELS and not os.path.isfile(model):
        return SHIPPED_MODELS[model]
    return model


logger = logging.getLogger("dials_cnn.default_model")


@dataclasses.dataclass
class Source:
    """One stream of simulated stills: a preset, drawn as it is or randomised beyond it."""

    preset: str
    randomise: bool
    n_train: int
    n_test: int

    @property
    def name(self):
        return f"random({self.preset})" if self.randomise else self.preset


PRESET_NAMES = ("L498", "LG36", "LN84", "LN83", "LO19")


def default_preprocess():
    """Native resolution around the beam, max-binned 2x2 after LCN (block pipeline: windows aligned to
    the 2x2 blocks, computed from block sums), as the default model sees stills.

    The LCN window is 22 px (11 blocks), not the paper's 5: LCN caps a spot that is small against its window at
    about sqrt(window^2 - 1) standard deviations, so with 5 x 5 a Bragg spot can never stand above
    ~4.9 and drowns in the noise maxima of a million pixels (measured on simulated L498 and LN84 stills:
    a count of bright input pixels separates hits from misses with ROC AUC 0.50 at window 5 and
    0.95 at window 21). 512 px after 2x binning covers the expert's 945 x 520 px window around the beam.

    The global z-score divides by at least one count (``zscore_min_std``): on sparse photon-counting
    images (Pilatus, Eiger) a single photon would otherwise stand as high above its window as a spot.
    """
    from dials_cnn.preprocess import PreprocessParams

    return PreprocessParams(pipeline="block", crop=512, bin=2, lcn_window=22, zscore_min_std=1.0)


def default_sources(scale=1.0):
    """The training mix. Randomised shots are half the data: the model must hold on detectors and
    samples it never saw, so diversity matters more than any one preset."""
    sources = [Source(name, False, int(630 * scale), int(240 * scale)) for name in PRESET_NAMES]
    sources += [Source(name, True, int(675 * scale), int(90 * scale)) for name in PRESET_NAMES]
    return sources


_WORKER = {}


def _init_worker(preprocess_dict, margin, map_stride):
    import torch

    from dials_cnn.preprocess import PreprocessParams

    torch.set_num_threads(1)
    _WORKER.update(preprocess=PreprocessParams.from_dict(preprocess_dict), margin=margin, map_stride=map_stride)


def _make_input(job):
    """(source index, preset, randomise, seed, index) -> (source index, float16 input, spot map or None,
    label, family)."""
    from dials_cnn.preprocess import prepare
    from dials_cnn.projection import flat_from_array
    from dials_cnn.simulate import simulate_image
    from dials_cnn.spot_targets import spot_target_map

    source_index, preset, randomise, seed, index = job
    still = simulate_image(preset, seed, index, randomise=randomise, vary_beam_centre=True)
    flat = flat_from_array(still.image, still.beam_centre_px, still.pixel_size_mm, still.mask)
    params, margin, stride = _WORKER["preprocess"], _WORKER["margin"], _WORKER["map_stride"]
    x = prepare(flat, params, margin=margin)
    spot_map = spot_target_map(still.spots, still.beam_centre_px, params, margin, stride) if stride else None
    return source_index, x.astype(np.float16), spot_map, still.truth["label"], still.family


def _simulator_fingerprint():
    """A digest of the simulator's code: a cache drawn by other simulator code is not reused."""
    from dials_cnn import presets, simulate

    digest = hashlib.sha1()
    for module in (simulate, presets):
        with open(module.__file__, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def simulate_inputs(sources, which, seed, preprocess, margin, nproc, log, cache=None, map_stride=None):
    """Simulate and preprocess the ``which`` ("train" or "test") stills of every source; with
    ``map_stride``, also their spot maps (:mod:`dials_cnn.spot_targets`) at that stride.

    With ``cache`` (a folder), the arrays are kept there and reused when the same recipe asks again
    with the same simulator code.
    """
    from dials_cnn.model import CLASS_NAMES
    from dials_cnn.training import DataSet

    if cache:
        from dials_cnn.spot_targets import TARGET_VERSION

        key = json.dumps([which, seed, margin, preprocess.to_dict(), [dataclasses.astuple(s) for s in sources],
                          map_stride, _simulator_fingerprint()] + ([TARGET_VERSION] if map_stride else []))
        stem = os.path.join(cache, f"{which}-{hashlib.sha1(key.encode()).hexdigest()[:12]}")
        if os.path.exists(stem + ".npz"):
            log(f"  {which}: reusing {stem}.npz")
            stored = np.load(stem + ".npz")
            return DataSet(np.load(stem + ".npy", mmap_mode="r"), stored["labels"], stored["groups"],
                           names=list(stored["families"]), spot_maps=stored["spot_maps"] if map_stride else None)

    jobs = []
    for k, source in enumerate(sources):
        n = source.n_train if which == "train" else source.n_test
        # Distinct seeds per source and split: test stills are never training stills.
        source_seed = seed * 1000 + k * 2 + (0 if which == "train" else 1)
        jobs += [(k, source.preset, source.randomise, source_seed, i) for i in range(n)]
    side = preprocess.crop + 2 * margin
    inputs = np.empty((len(jobs), side, side), dtype=np.float16)
    labels = np.empty(len(jobs), dtype=np.int64)
    spot_maps = np.zeros((len(jobs), side // map_stride, side // map_stride), np.uint8) if map_stride else None
    groups, families = [], []
    started = time.time()
    keep_freed_memory()  # inherited by the workers: a still's arrays are reused, not page-faulted in again
    context = multiprocessing.get_context("fork")
    with context.Pool(nproc, initializer=_init_worker, initargs=(preprocess.to_dict(), margin, map_stride)) as pool:
        for n, (k, x, spot_map, label, family) in enumerate(pool.imap(_make_input, jobs, chunksize=4)):
            inputs[n] = x
            if map_stride:
                spot_maps[n] = spot_map
            labels[n] = CLASS_NAMES.index(label)
            groups.append(sources[k].name)
            families.append(family)
            if (n + 1) % 200 == 0 or n + 1 == len(jobs):
                rate = (n + 1) / (time.time() - started)
                log(f"  {which}: {n + 1}/{len(jobs)} stills, {rate:.1f} images/s, "
                    f"ETA {(len(jobs) - n - 1) / rate:.0f} s")
    if cache:
        os.makedirs(cache, exist_ok=True)
        np.save(stem + ".npy", inputs)
        np.savez(stem + ".npz", labels=labels, groups=np.asarray(groups), families=np.asarray(families),
                 **({"spot_maps": spot_maps} if map_stride else {}))
    return DataSet(inputs, labels, np.asarray(groups), names=families, spot_maps=spot_maps)


def per_source_metrics(network, dataset, crop, threshold=0.5):
    """The paper's Hit+Maybe recall / Miss specificity for every source and detector family."""
    from dials_cnn.training import classification_metrics, predict_inputs

    probabilities = predict_inputs(network, dataset.inputs, crop)
    table = {}
    keys = [("source", g) for g in dict.fromkeys(dataset.groups)]
    keys += [("family", f) for f in dict.fromkeys(dataset.names)]
    keys.append(("all", "all"))
    for kind, value in keys:
        if kind == "source":
            chosen = dataset.groups == value
        elif kind == "family":
            chosen = np.asarray(dataset.names) == value
        else:
            chosen = np.ones(len(dataset), bool)
        metrics = classification_metrics(probabilities[chosen], dataset.labels[chosen], threshold)
        table[f"{kind}:{value}"] = metrics
    return table


def format_metrics(table):
    lines = [f"{'test set':<26}{'n':>6}{'Hit+Maybe recall':>18}{'Miss specificity':>18}{'3-class acc':>13}"]
    for key, m in table.items():
        recall = "-" if m.get("hit_maybe_recall") is None else f"{100 * m['hit_maybe_recall']:.1f} %"
        specificity = "-" if m.get("miss_specificity") is None else f"{100 * m['miss_specificity']:.1f} %"
        lines.append(f"{key:<26}{m['n']:>6}{recall:>18}{specificity:>18}{100 * m['accuracy']:>12.1f}%")
    return "\n".join(lines)


def build(output=DEFAULT_MODEL_PATH, architecture="spotcount", scale=1.0, epochs=48, batches_per_epoch=60,
          batch_size=32, seed=2018, nproc=2, margin=32, preprocess=None, cache=None, log=print,
          architecture_kwargs=None, lr_start=0.05):
    """Simulate, train and test the default model; write it to ``output`` with its metrics.
    ``architecture_kwargs`` add to (or replace) those that fit the architecture to the preprocessing;
    spotcount's context layers are the default model's unless they say otherwise."""
    import torch

    from dials_cnn.training import TrainingRecipe, split_indices, train

    preprocess = preprocess or default_preprocess()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)  # before an hour of work, not after
    sources = default_sources(scale)
    from dials_cnn.model import ARCHITECTURES, architecture_defaults

    map_stride = getattr(ARCHITECTURES[architecture], "stride", None)  # counting networks learn from spot maps
    recipe_kwargs = {"dilations": list(RECIPES["default"]["dilations"])} if architecture == "spotcount" else {}
    architecture_kwargs = {**architecture_defaults(architecture, preprocess), **recipe_kwargs,
                           **(architecture_kwargs or {})}
    log(f"Default model: {architecture} {architecture_kwargs}, preprocessing {preprocess}")
    log(f"Sources: " + ", ".join(f"{s.name} {s.n_train}+{s.n_test}" for s in sources))
    started = time.time()
    data = simulate_inputs(sources, "train", seed, preprocess, margin, nproc, log, cache, map_stride)
    test_set = simulate_inputs(sources, "test", seed, preprocess, margin, nproc, log, cache, map_stride)
    log(f"Simulated and preprocessed {len(data) + len(test_set)} stills in {time.time() - started:.0f} s")
    train_idx, val_idx, _ = split_indices(len(data), fractions=(0.85, 0.15, 0.0), seed=seed)
    recipe = TrainingRecipe(
        epochs=epochs, batches_per_epoch=batches_per_epoch, batch_size=batch_size, lr_start=lr_start,
        lr_end=lr_start / 100, max_shift=margin, balance="group_class", keep="best", max_grad_norm=10.0,
    )
    torch.set_num_threads(nproc)
    provenance = {
        "data": "in-memory simulated stills (dials_cnn.simulate), sources: "
        + ", ".join(f"{s.name} train {s.n_train} test {s.n_test}" for s in sources),
        "simulation_seed": seed,
        "built_by": "python -m dials_cnn.default_model (make default-model)",
    }
    result = train(
        data.subset(train_idx), data.subset(val_idx), architecture=architecture,
        architecture_kwargs=architecture_kwargs, preprocess=preprocess,
        recipe=recipe, seed=seed, test_set=test_set, output=None, provenance=provenance, num_threads=nproc,
        log=log,
    )
    table = per_source_metrics(result.model.network, test_set, preprocess.crop)
    log("Held-out simulated test stills (other seeds):\n" + format_metrics(table))
    metrics = dict(result.metrics)
    metrics["held_out_by_source"] = table
    from dials_cnn.model import save_model

    save_model(output, result.model.network, architecture, preprocess,
               architecture_kwargs=result.model.architecture_kwargs, provenance=result.model.provenance,
               metrics=metrics)
    summary = os.path.splitext(output)[0] + ".json"
    from dials_cnn.fileio import atomic_write

    with atomic_write(summary) as handle:
        json.dump({"architecture": architecture, "preprocess": preprocess.to_dict(), "recipe": recipe.to_dict(),
                   "history": result.history, "held_out_by_source": table,
                   "build_seconds": time.time() - started}, handle, indent=1)
    log(f"Wrote {output} ({os.path.getsize(output) / 1024:.0f} kB) and {summary} in {time.time() - started:.0f} s")
    return result, table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="default: the shipped file of --model")
    parser.add_argument("--model", choices=sorted(SHIPPED_MODELS), default="default",
                        help="which shipped recipe: default (context dilations 2 4) or fast (the same, separable)")
    parser.add_argument("--architecture", default="spotcount")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of simulated stills")
    parser.add_argument("--epochs", type=int, default=48)
    parser.add_argument("--batches-per-epoch", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--lr", type=float, default=0.05,
                        help="starting learning rate; it falls exponentially to a hundredth of it")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--cache", default=None, help="folder keeping the simulated inputs for a rerun")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's network and preprocessing (ke2018, 960 resize, 720 crop, 5x5 LCN) on the "
                             "same simulated stills, for a side-by-side comparison")
    parser.add_argument("--dilations", type=int, nargs="+", default=None,
                        help="spotcount: the dilations of its context layers instead of --model's")
    parser.add_argument("--lcn-window", type=int, default=None,
                        help="the LCN window in native pixels instead of the default's 22 (an odd number of "
                             "2-pixel blocks, e.g. 30)")
    parser.add_argument("--separable", action="store_true",
                        help="spotcount: depthwise-separable context layers (a cheaper network; --model fast has them)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    architecture, preprocess = args.architecture, None
    if args.paper:
        from dials_cnn.preprocess import KE2018

        architecture, preprocess = "ke2018", KE2018
    if args.lcn_window:
        preprocess = dataclasses.replace(preprocess or default_preprocess(), lcn_window=args.lcn_window)
    recipe = RECIPES[args.model]
    dilations = args.dilations or recipe["dilations"]
    separable = args.separable or recipe["separable"]
    build(args.output or SHIPPED_MODELS[args.model], architecture, args.scale, args.epochs,
          args.batches_per_epoch, args.batch_size, args.seed, args.nproc, preprocess=preprocess, cache=args.cache,
          log=lambda line: print(line, flush=True),
          architecture_kwargs={"dilations": list(dilations), **({"separable": True} if separable else {})}
          if architecture == "spotcount" else None,
          lr_start=args.lr)


if __name__ == "__main__":
    sys.exit(main())
