"""The paper's setting (Table 3, Tables 4-6): its network and preprocessing (``architecture=ke2018``, 960
resize, 720 crop, 5 x 5 LCN) trained on ONE run's stills and tested on the held-out stills of every run,
beside the shipped default model (one network for every detector) on the same held-out stills.

The stills are those of ``make default-model`` (same sources, seeds and split; ``--cache`` keeps the
paper-preprocessed arrays, ~10 GB, so that a rerun skips the 15 min of simulation). Each per-run
network gets the default model's recipe (SGD, class-balanced batches of 32, lr falling a hundredfold,
``--epochs`` x ``--batches-per-epoch``), far below the paper's 120 x 100 batches of 64.

    /usr/bin/python3 benchmarks/paper_per_run.py --cache work_data/paper_cache --default
"""

import argparse
import json
import sys
import time

import numpy as np

RUNS = ("L498", "LG36", "LN84", "LN83", "LO19")


def metrics_by_source(probabilities, test, threshold=0.5):
    """{source: {n, Hit+Maybe recall, Miss specificity (at ``threshold``), 3-class accuracy, ROC AUC of
    P(HIT)+P(MAYBE)}}."""
    from sklearn.metrics import roc_auc_score

    from dials_cnn.model import CLASS_NAMES
    from dials_cnn.training import classification_metrics

    row = {}
    for source in dict.fromkeys(test.groups):
        chosen = test.groups == source
        m = classification_metrics(probabilities[chosen], test.labels[chosen], threshold)
        positive = test.labels[chosen] != CLASS_NAMES.index("MISS")
        score = 1.0 - probabilities[chosen, CLASS_NAMES.index("MISS")]
        row[source] = {"n": m["n"], "hit_maybe_recall": m["hit_maybe_recall"],
                       "miss_specificity": m["miss_specificity"], "accuracy": m["accuracy"],
                       "auc": float(roc_auc_score(positive, score))}
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=None, help="keeps the paper-preprocessed stills for a rerun")
    parser.add_argument("--runs", nargs="*", default=list(RUNS),
                        help="the runs to train a network on (none: only --default)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batches-per-epoch", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=2018, help="the default model's seed (same stills)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--default", action="store_true",
                        help="also score the shipped default model on the same held-out stills")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from dials_cnn import default_model
    from dials_cnn.model import load_model
    from dials_cnn.preprocess import KE2018
    from dials_cnn.training import TrainingRecipe, predict_inputs, split_indices, train

    margin = 32
    sources = default_model.default_sources()
    log = lambda line: print(line, flush=True)  # noqa: E731
    data = default_model.simulate_inputs(sources, "train", args.seed, KE2018, margin, args.nproc, log, args.cache)
    test = default_model.simulate_inputs(sources, "test", args.seed, KE2018, margin, args.nproc, log, args.cache)
    torch.set_num_threads(args.nproc)
    recipe = TrainingRecipe(epochs=args.epochs, batches_per_epoch=args.batches_per_epoch, batch_size=32,
                            lr_start=args.lr, lr_end=args.lr / 100, max_shift=margin, balance="group_class",
                            keep="best", max_grad_norm=10.0)
    results = {}
    for run in args.runs:
        subset = data.subset(np.flatnonzero(data.groups == run))
        train_idx, val_idx, _ = split_indices(len(subset), fractions=(0.85, 0.15, 0.0), seed=args.seed)
        started = time.time()
        result = train(subset.subset(train_idx), subset.subset(val_idx), architecture="ke2018", preprocess=KE2018,
                       recipe=recipe, seed=args.seed, log=log)
        probabilities = predict_inputs(result.model.network, test.inputs, KE2018.crop)
        results[f"ke2018 trained on {run}"] = {"training_images": int(len(train_idx)),
                                               "train_seconds": round(time.time() - started),
                                               "tested_on": metrics_by_source(probabilities, test)}
    if args.default:
        preprocess = default_model.default_preprocess()
        model = load_model(default_model.shipped_model_path())
        default_test = default_model.simulate_inputs(sources, "test", args.seed, preprocess, margin, args.nproc,
                                                     log, args.cache)
        probabilities = predict_inputs(model.network, default_test.inputs, preprocess.crop)
        results["shipped default (every detector)"] = {"tested_on": metrics_by_source(probabilities, default_test)}

    columns = list(dict.fromkeys(test.groups))
    print("\nHeld-out stills of every source: Hit+Maybe recall / Miss specificity at P(HIT)+P(MAYBE) > 0.5, "
          "ROC AUC in brackets; bold: the run a per-run network was trained on")
    print("| network | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name, row in results.items():
        cells = []
        for source in columns:
            m = row["tested_on"][source]
            cell = f"{100 * m['hit_maybe_recall']:.0f} / {100 * m['miss_specificity']:.0f} ({m['auc']:.2f})"
            cells.append(f"**{cell}**" if name.endswith(f" {source}") else cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
