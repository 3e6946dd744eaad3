"""Model files side by side on the held-out stills of ``make default-model`` (issue 4).

Every model is scored on the same held-out stills (the ``test`` split of each of ``--seeds``, 240 per
preset and 90 per randomised source, none of them ever trained on; several seeds are pooled), each preprocessed the way its model file
says. Printed per model: Hit+Maybe recall / Miss specificity at ``--threshold`` over all stills, the ROC
AUC of P(HIT) + P(MAYBE) over all stills, the presets and the randomised shots, the randomised shots'
AUC per detector family, the share of nanocrystal HITs and MAYBEs kept (mosaic domains below 500 Å,
spots several pixels broad) and recall / specificity per source.

A build with one ``--seed`` has not seen the held-out stills of another either, so builds of different
seeds can be compared on the pooled stills of both. One preset's 240 stills hold only 25-116 hits, so a
single seed's per-preset recall moves by several per cent from one draw to the next. With the build's ``--cache``, its stills are reused; stills for another
preprocessing (another LCN window) are drawn once and cached beside them.

    /usr/bin/python3 benchmarks/compare_models.py default work_data/w30/default_model.pt \\
        --seeds 2018 2019 --cache work_data/w30/cache
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper_per_run import metrics_by_source  # noqa: E402  (the same per-source metrics and AUC)

FAMILIES = ("cspad", "rayonix", "pilatus", "eiger")
# The paper's Table 3: its CNN's Hit+Maybe recall / Miss specificity per run, in %.
PAPER_TABLE3 = {"L498": (69.0, 93.1), "LG36": (91.1, 98.2), "LN84": (98.5, 89.9), "LN83": (98.5, 96.9),
                "LO19": (94.8, 96.0)}
NANOCRYSTAL_DOMAIN_A = 500.0


def nanocrystals(sources, seed):
    """True for the held-out stills of ``seed`` with a crystal whose mosaic domains are below 500 Å:
    broad spots, several pixels wide. The shots are drawn again (not rendered), in simulate_inputs' order."""
    from dials_cnn.presets import PRESETS
    from dials_cnn.simulate import image_rng, sample_shot

    chosen = []
    for k, source in enumerate(sources):
        for i in range(source.n_test):
            shot = sample_shot(PRESETS[source.preset], image_rng(seed * 1000 + k * 2 + 1, i),
                               randomise=source.randomise, vary_beam_centre=True)
            chosen.append(bool(shot.pulse and shot.crystals and
                               min(c.domain_size_A for c in shot.crystals) < NANOCRYSTAL_DOMAIN_A))
    return np.array(chosen)


def score(model, sources, seeds, nproc, cache, threshold, log, small=None, sweep=()):
    """{summary fields} of one :class:`~dials_cnn.model.ScreeningModel` on the ``test`` stills of
    ``seeds``, pooled; ``sweep``: also recall / specificity per source at each of these thresholds."""
    from sklearn.metrics import roc_auc_score

    from dials_cnn import default_model
    from dials_cnn.model import CLASS_NAMES, SpotCounter
    from dials_cnn.training import DataSet, predict_inputs

    margin = 32
    stride = SpotCounter.stride if model.architecture == "spotcount" else None
    probabilities, labels, groups, names = [], [], [], []
    for seed in seeds:
        test = default_model.simulate_inputs(sources, "test", seed, model.preprocess, margin, nproc, log, cache, stride)
        probabilities.append(predict_inputs(model.network, test.inputs, model.preprocess.crop))
        labels.append(test.labels)
        groups.append(test.groups)
        names += list(test.names)
    probabilities = np.concatenate(probabilities)
    test = DataSet(np.zeros((len(names), 1, 1), np.float16), np.concatenate(labels), np.concatenate(groups), names)
    positive = test.labels != CLASS_NAMES.index("MISS")
    p_positive = 1.0 - probabilities[:, CLASS_NAMES.index("MISS")]
    kept = p_positive > threshold
    randomised = np.array([g.startswith("random") for g in test.groups])
    families = np.asarray(test.names)

    def auc(chosen):
        both = chosen.any() and len(set(positive[chosen])) == 2
        return round(float(roc_auc_score(positive[chosen], p_positive[chosen])), 3) if both else None

    nano = positive & small if small is not None else np.zeros(len(positive), bool)
    return {
        "nanocrystals_kept": [int(nano.sum()), round(100 * float(kept[nano].mean()), 1) if nano.any() else None],
        "all": [round(100 * float(kept[positive].mean()), 1), round(100 * float((~kept[~positive]).mean()), 1)],
        "auc_all_presets_randomised": [auc(np.ones(len(positive), bool)), auc(~randomised), auc(randomised)],
        "randomised_auc_by_family": {f: auc(randomised & (families == f)) for f in FAMILIES},
        "by_source": {source: [round(100 * m["hit_maybe_recall"], 1), round(100 * m["miss_specificity"], 1),
                               round(m["auc"], 3)]
                      for source, m in metrics_by_source(probabilities, test, threshold).items()},
        "sweep": {str(t): {source: [round(100 * m["hit_maybe_recall"], 1), round(100 * m["miss_specificity"], 1)]
                           for source, m in metrics_by_source(probabilities, test, t).items()}
                  for t in sweep},
    }


def format_table(results):
    sources = list(next(iter(results.values()))["by_source"])
    head = ["model", "all", "AUC all / presets / randomised", "randomised AUC " + " / ".join(FAMILIES),
            "nanocrystal HITs + MAYBEs kept (n)"]
    lines = ["| " + " | ".join(head + sources) + " |", "|" + "---|" * (len(head) + len(sources))]
    for name, r in results.items():
        cells = [name, "%.1f / %.1f" % tuple(r["all"]),
                 " / ".join("-" if a is None else "%.3f" % a for a in r["auc_all_presets_randomised"]),
                 " / ".join("-" if a is None else "%.3f" % a for a in r["randomised_auc_by_family"].values()),
                 "%s (%d)" % (r["nanocrystals_kept"][1], r["nanocrystals_kept"][0])]
        cells += ["%.1f / %.1f" % tuple(r["by_source"][s][:2]) for s in sources]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_sweep(name, sweep):
    """Recall / specificity per source at each threshold; * where a preset meets both of the paper's."""
    sources = list(next(iter(sweep.values())))
    lines = [f"{name}: Hit+Maybe recall / Miss specificity by threshold (* both at least the paper's Table 3)",
             "| threshold | " + " | ".join(sources) + " |", "|" + "---|" * (len(sources) + 1),
             "| paper | " + " | ".join("%.1f / %.1f" % PAPER_TABLE3[s] if s in PAPER_TABLE3 else "" for s in sources)
             + " |"]
    for threshold, row in sweep.items():
        cells = []
        for source in sources:
            recall, specificity = row[source]
            paper = PAPER_TABLE3.get(source)
            met = paper is not None and recall >= paper[0] and specificity >= paper[1]
            cells.append("%.1f / %.1f%s" % (recall, specificity, " *" if met else ""))
        lines.append(f"| {threshold} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model files, or 'default' / 'fast' for the shipped ones")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2018],
                        help="whose held-out stills (make default-model's --seed); several are pooled")
    parser.add_argument("--cache", default=None, help="keeps the simulated stills for a rerun")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--sweep", type=float, nargs="*", default=[],
                        help="also print recall / specificity per source at these thresholds, beside the paper's")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from dials_cnn import default_model
    from dials_cnn.model import load_model

    torch.set_num_threads(args.nproc)
    log = lambda line: print(line, flush=True)  # noqa: E731
    sources = default_model.default_sources()
    small = np.concatenate([nanocrystals(sources, seed) for seed in args.seeds])
    results = {}
    for name in args.models:
        model = load_model(default_model.shipped_model_path(name))
        results[name] = score(model, sources, args.seeds, args.nproc, args.cache, args.threshold, log, small,
                              args.sweep)
        log(f"{name}: all {results[name]['all']}, AUC all / presets / randomised "
            f"{results[name]['auc_all_presets_randomised']}, randomised by family "
            f"{results[name]['randomised_auc_by_family']}")
    log(f"\nHeld-out stills of seeds {' '.join(map(str, args.seeds))}, threshold {args.threshold} "
        "(Hit+Maybe recall / Miss specificity, %):")
    log(format_table(results))
    for name, r in results.items():
        if r["sweep"]:
            log("\n" + format_sweep(name, r["sweep"]))
    if args.json:
        from dials_cnn.fileio import atomic_write

        with atomic_write(args.json) as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
