"""Cross-detector study (issue 4; the paper's Tables 4-6 failed here at 12-41 %): the default model's
recipe trained on the presets of ONE detector family, tested on the presets of the other.

Uses the simulated, preprocessed stills of ``make default-model`` (``--cache``: the folder passed to
``python -m dials_cnn.default_model --cache``; simulated again if absent), so it measures exactly the
default model's network, preprocessing and training, with only the training data restricted:

* CSPAD presets (L498, LG36) only -> tested on the Rayonix presets (LN84, LN83, LO19), and back;
* for reference, each tested on its own family's held-out stills.

    /usr/bin/python3 benchmarks/cross_family.py --cache work_data/default_model_cache
"""

import argparse
import json
import os
import sys
import time

import numpy as np

FAMILIES = {"cspad": ("L498", "LG36"), "rayonix": ("LN84", "LN83", "LO19")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", required=True, help="the default model's simulation cache")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batches-per-epoch", type=int, default=40)
    parser.add_argument("--seed", type=int, default=2018, help="the default model's seed (same stills)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from dials_cnn import default_model
    from dials_cnn.model import ARCHITECTURES, architecture_defaults
    from dials_cnn.training import TrainingRecipe, classification_metrics, predict_inputs, split_indices, train

    preprocess = default_model.default_preprocess()
    margin = 32
    stride = ARCHITECTURES["spotcount"].stride
    sources = default_model.default_sources()
    log = lambda line: print(line, flush=True)  # noqa: E731
    data = default_model.simulate_inputs(sources, "train", args.seed, preprocess, margin, args.nproc, log,
                                         args.cache, stride)
    test = default_model.simulate_inputs(sources, "test", args.seed, preprocess, margin, args.nproc, log,
                                         args.cache, stride)
    torch.set_num_threads(args.nproc)
    recipe = TrainingRecipe(epochs=args.epochs, batches_per_epoch=args.batches_per_epoch, batch_size=32,
                            lr_start=0.05, lr_end=5e-4, max_shift=margin, balance="group_class",
                            max_grad_norm=10.0)
    results = {}
    for trained_on, presets in FAMILIES.items():
        chosen = np.flatnonzero(np.isin(data.groups, presets))
        subset = data.subset(chosen)
        train_idx, val_idx, _ = split_indices(len(subset), fractions=(0.85, 0.15, 0.0), seed=args.seed)
        started = time.time()
        result = train(subset.subset(train_idx), subset.subset(val_idx), architecture="spotcount",
                       architecture_kwargs=architecture_defaults("spotcount", preprocess), preprocess=preprocess,
                       recipe=recipe, seed=args.seed, log=log)
        network = result.model.network
        row = {"training_images": int(len(train_idx)), "train_seconds": round(time.time() - started)}
        for tested_on, test_presets in FAMILIES.items():
            for preset in test_presets:
                picked = np.flatnonzero(test.groups == preset)
                probabilities = predict_inputs(network, test.inputs[picked], preprocess.crop)
                metrics = classification_metrics(probabilities, test.labels[picked])
                row[preset] = {k: metrics[k] for k in ("n", "hit_maybe_recall", "miss_specificity", "accuracy")}
        results[trained_on] = row

    print("\nTrained on one detector family (presets only), tested on held-out stills of every preset")
    print("(Hit+Maybe recall / Miss specificity, decision P(HIT)+P(MAYBE) > 0.5):")
    header = "| trained on | " + " | ".join(f"{p} ({f})" for f, ps in FAMILIES.items() for p in ps) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for trained_on, row in results.items():
        cells = []
        for family, presets in FAMILIES.items():
            for preset in presets:
                m = row[preset]
                cell = f"{100 * m['hit_maybe_recall']:.0f} / {100 * m['miss_specificity']:.0f}"
                cells.append(f"**{cell}**" if family != trained_on else cell)
        print(f"| {trained_on} ({row['training_images']} stills) | " + " | ".join(cells) + " |")
    print("(bold: the other detector family, never seen in training)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
