"""CNN versus spotfinder baseline on expert-annotated images: every number (JSON) and one HTML report.

The analysis follows the paper's tables and figures: Table 3 (Hit+Maybe recall / Miss specificity of
both methods), the CNN's 3x3 confusion matrix and per-class recall/specificity, Fig. 7 (baseline
spot counts per expert class), Fig. 9 (confidence of correct classifications) with a calibration
curve, the keep-rate versus hit-recall curve as the veto threshold moves, Fig. 10 (saliency
|dL/dx| beyond 3 sigma), Fig. 11 (t-SNE of the features the last layer sees) and Tables 4-6 (success
rate of each model on each run). Images/s of both methods are measured on the same images.

The analysis functions are pure functions of expert labels, probabilities and spot counts, so the
numbers in the report can be recomputed from the per-image records the JSON also holds. The HTML is
rendered from the JSON document (plus saliency images): every table cell carries ``data-json``, the
path of the value it shows.
"""

import base64
import datetime
import html
import io
import json
import math
import os

import numpy as np

from dials_cnn.annotations import LABELS, image_key, read_annotations, resolve_path
from dials_cnn.evaluation import binary_agreement, three_class_confusion
from dials_cnn.fileio import atomic_write

DOCUMENT_FORMAT = "dials_cnn.evaluation"
DOCUMENT_VERSION = 1
CURVE_THRESHOLDS = tuple(round(t, 2) for t in np.linspace(0.0, 1.0, 101))
CONFIDENCE_BINS = tuple(round(b, 2) for b in np.linspace(0.0, 1.0, 21))
CALIBRATION_BINS = tuple(round(b, 2) for b in np.linspace(0.0, 1.0, 11))
CLASS_COLOURS = {"HIT": "#d62728", "MAYBE": "#1f77b4", "MISS": "#2ca02c"}  # the paper's Fig. 11 colours
FOLLOW_UPS = ()


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (no annotated image, unknown labels); the message says what to do."""


# ------------------------------------------------------------------------------ images and labels


def run_name(annotation_file):
    """fv5080 keeps ``annotation/<RUN>/expert_annotation.txt``: the folder names the run."""
    stem = os.path.splitext(os.path.basename(annotation_file))[0]
    if stem == "expert_annotation":
        return os.path.basename(os.path.dirname(os.path.abspath(annotation_file))) or stem
    return stem


def match_annotations(units, annotation_files):
    """Expert label and run of each unit (:func:`dials_cnn.classify.image_units`).

    Returns ``(runs, unannotated)``: ``runs`` is a list of ``(name, annotation_file, [(unit, label)])``
    in the order of ``annotation_files`` (runs without any of the images are left out);
    ``unannotated`` the units no file labels.
    """
    by_image = {}
    runs = []
    names = set()
    for annotation_file in annotation_files:
        name = run_name(annotation_file)
        while name in names:
            name += "+"
        names.add(name)
        members = []
        runs.append((name, annotation_file, members))
        for record in read_annotations(annotation_file):
            path = os.path.realpath(resolve_path(annotation_file, record.path))
            by_image.setdefault((path, record.index), (members, record.label))
    unannotated = []
    for unit in units:
        found = by_image.get((os.path.realpath(unit.path), unit.file_index))
        if found is None:
            unannotated.append(unit)
        else:
            found[0].append((unit, found[1]))
    runs = [run for run in runs if run[2]]
    if not runs:
        raise EvaluationError(
            f"None of the {len(units)} images is labelled in {', '.join(annotation_files)}; pass the "
            "annotation file(s) written for these images (paths in them are relative to the file's folder)"
        )
    return runs, unannotated


# ------------------------------------------------------------------------------ pure analyses


def hit_maybe_probability(probabilities):
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, 3)
    return probabilities[:, 0] + probabilities[:, 1]


def cnn_decisions(probabilities, threshold):
    """The classifier's rule (dials_cnn.decision): Hit if P(HIT) + P(MAYBE) > threshold."""
    return np.where(hit_maybe_probability(probabilities) > threshold, "Hit", "Miss")


def per_class_rates(counts):
    """One-versus-rest recall, specificity and precision of each class from a 3x3 matrix."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    rates = {}
    for k, label in enumerate(LABELS):
        tp = counts[k, k]
        positives = counts[k].sum()
        predicted = counts[:, k].sum()
        negatives = total - positives
        tn = total - positives - predicted + tp
        rates[label] = {
            "recall": _ratio(tp, positives),
            "specificity": _ratio(tn, negatives),
            "precision": _ratio(tp, predicted),
            "n_expert": int(positives),
        }
    return rates


def _ratio(numerator, denominator):
    return float(numerator / denominator) if denominator else None


def _nan_to_none(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def table3(expert, decisions):
    """The paper's Table 3 of one method, as a dict (counts, recall, specificity, success, keep rate)."""
    return {k: _nan_to_none(v) for k, v in binary_agreement(expert, decisions).as_dict().items()}


def confidence_histograms(expert, probabilities, threshold, bins=CONFIDENCE_BINS):
    """Fig. 9: P(MISS) of images correctly vetoed and P(HIT)+P(MAYBE) of images correctly kept."""
    expert = np.asarray(expert)
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, 3)
    decisions = cnn_decisions(probabilities, threshold)
    out = {"bins": list(bins)}
    for name, correct, values in (
        ("miss", (expert == "MISS") & (decisions == "Miss"), probabilities[:, 2]),
        ("hit_maybe", (expert != "MISS") & (decisions == "Hit"), hit_maybe_probability(probabilities)),
    ):
        chosen = values[correct]
        out[name] = {
            "counts": np.histogram(chosen, bins=bins)[0].tolist(),
            "n": int(correct.sum()),
            "mean": float(chosen.mean()) if len(chosen) else None,
        }
    return out


def calibration(expert, probabilities, bins=CALIBRATION_BINS):
    """Reliability of P(HIT)+P(MAYBE): per bin, images, mean prediction, observed Hit-or-Maybe fraction."""
    expert = np.asarray(expert)
    p = hit_maybe_probability(probabilities)
    observed = (expert != "MISS").astype(np.float64)
    which = np.clip(np.digitize(p, bins[1:-1], right=False), 0, len(bins) - 2)
    rows = []
    ece = 0.0
    for b in range(len(bins) - 1):
        inside = which == b
        n = int(inside.sum())
        mean_p = float(p[inside].mean()) if n else None
        fraction = float(observed[inside].mean()) if n else None
        if n:
            ece += n * abs(mean_p - fraction)
        rows.append({"low": bins[b], "high": bins[b + 1], "n": n, "mean_predicted": mean_p, "observed": fraction})
    return {
        "bins": rows,
        "expected_calibration_error": float(ece / len(p)) if len(p) else None,
        "brier_score": float(np.mean((p - observed) ** 2)) if len(p) else None,
    }


def operating_curve(expert, scores, thresholds, keep):
    """Keep rate, Hit+Maybe recall and Miss specificity at each threshold; ``keep(scores, t)`` -> bool."""
    expert = np.asarray(expert)
    positive = expert != "MISS"
    rows = []
    for t in thresholds:
        kept = keep(np.asarray(scores), t)
        rows.append({
            "threshold": float(t),
            "keep_rate": float(kept.mean()) if len(kept) else None,
            "hit_maybe_recall": _ratio(float((kept & positive).sum()), float(positive.sum())),
            "miss_specificity": _ratio(float((~kept & ~positive).sum()), float((~positive).sum())),
        })
    return rows


def cnn_analysis(expert, probabilities, threshold):
    """Every CNN number of one run: Table 3, 3x3, per class, Fig. 9, calibration, operating curve."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, 3)
    decisions = cnn_decisions(probabilities, threshold)
    predicted = np.asarray(LABELS)[probabilities.argmax(axis=1)] if len(probabilities) else np.array([])
    three = three_class_confusion(expert, predicted)
    return {
        "threshold": threshold,
        "table3": table3(expert, decisions),
        "three_class": {
            "counts": three.tolist(),
            "rows": ["expert " + label for label in LABELS],
            "columns": list(LABELS),
            "accuracy": _ratio(float(np.trace(three)), float(three.sum())),
        },
        "per_class": per_class_rates(three),
        "confidence": confidence_histograms(expert, probabilities, threshold),
        "calibration": calibration(expert, probabilities),
        "operating_curve": operating_curve(
            expert, hit_maybe_probability(probabilities), CURVE_THRESHOLDS, lambda p, t: p > t
        ),
    }


def spot_count_histogram(expert, counts, threshold, n_bins=40):
    """Fig. 7: histogram of spot counts per expert class, on shared integer bin edges."""
    expert = np.asarray(expert)
    counts = np.asarray(counts, dtype=np.int64)
    top = int(max(counts.max() if len(counts) else 0, threshold)) + 1
    step = max(1, int(math.ceil(top / n_bins)))
    edges = list(range(0, top + step, step))
    return {
        "edges": edges,
        "threshold": threshold,
        "counts": {label: np.histogram(counts[expert == label], bins=edges)[0].tolist() for label in LABELS},
    }


def baseline_analysis(expert, counts, threshold):
    from dials_cnn.baseline import hit_decisions

    counts = np.asarray(counts, dtype=np.int64)
    thresholds = sorted(set(int(c) for c in counts) | {0, int(threshold), int(counts.max() + 1 if len(counts) else 1)})
    return {
        "threshold": threshold,
        "table3": table3(expert, hit_decisions(counts, threshold)),
        "spot_counts": spot_count_histogram(expert, counts, threshold),
        "operating_curve": operating_curve(expert, counts, thresholds, lambda c, t: c >= t),
    }


def cross_dataset(document):
    """Tables 4-6: success rate (and recall, specificity) of every model on every run."""
    models = [m["name"] for m in document["models"]]
    runs = [r["name"] for r in document["runs"]]
    out = {"models": models, "runs": runs}
    for key in ("success_rate", "hit_maybe_recall", "miss_specificity"):
        out[key] = [[r["cnn"][m]["table3"][key] for r in document["runs"]] for m in models]
    if document.get("baseline"):
        out["baseline_success_rate"] = [r["baseline"]["table3"]["success_rate"] for r in document["runs"]]
    return out


# ------------------------------------------------------------------------------ network passes


def classify_with_features(units, model, threshold=0.5, batch_size=16, nproc=1):
    """:func:`dials_cnn.classify.classify_units` plus the features the last layer sees, per image.

    A forward hook on the network's final linear layer copies its input (288 values for ke2018):
    batches reach it in input order, skipping unreadable images, so no second pass is needed.
    Returns ``(classification, features)``, ``features`` with one row per image (NaN for errors).
    """
    import torch

    from dials_cnn.classify import classify_units

    captured = []
    handle = model.network.classifier.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0].detach().to(torch.float32).numpy().copy())
    )
    try:
        # the hook is in this process: the workers only read and preprocess
        classification = classify_units(units, model, threshold=threshold, batch_size=batch_size, nproc=nproc,
                                        network_in_workers=False)
    finally:
        handle.remove()
    ok = [k for k, record in enumerate(classification.records) if record.decision != "error"]
    width = captured[0].shape[1] if captured else 0
    features = np.full((len(units), width), np.nan, dtype=np.float32)
    if captured:
        stacked = np.concatenate(captured)
        if len(stacked) != len(ok):
            raise RuntimeError(f"captured {len(stacked)} feature rows for {len(ok)} classified images")
        features[ok] = stacked
    return classification, features


def saliency(unit, model, label):
    """Fig. 10: the network input of ``unit`` and |dL/dx| for the loss of class ``label``, and the
    boolean map of pixels whose gradient lies more than 3 sigma from its mean (the paper's rule)."""
    import torch

    from dials_cnn.classify import prepared_inputs

    (_, array, error), = list(prepared_inputs([unit], model.preprocess))
    if error is not None:
        return None
    network = model.network.eval()
    x = torch.from_numpy(array)[None, None].clone().requires_grad_(True)
    loss = torch.nn.functional.nll_loss(network(x), torch.tensor([LABELS.index(label)]))
    (gradient,) = torch.autograd.grad(loss, x)
    gradient = gradient[0, 0].numpy().astype(np.float64)
    salient = np.abs(gradient - gradient.mean()) > 3 * gradient.std()
    return array, gradient, salient


def pick_saliency_images(expert, records, per_class):
    """The first ``per_class`` readable images of each expert class, in input order."""
    chosen = []
    for label in LABELS:
        members = [k for k, (e, r) in enumerate(zip(expert, records)) if e == label and r.decision != "error"]
        chosen.extend(members[:per_class])
    return chosen


def tsne_embedding(features, seed=0, perplexity=30.0):
    """2-D t-SNE (sklearn) of the feature rows; None when there are too few images."""
    if len(features) < 5:
        return None
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    perplexity = float(min(perplexity, max(1.0, (len(features) - 1) / 3.0)))
    # exact is quicker below a few hundred points; Barnes-Hut's OpenMP threads spin against torch's
    method = "exact" if len(features) < 300 else "barnes_hut"
    embedding = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto",
                     method=method)
    with threadpool_limits(limits=1, user_api="openmp"):
        return embedding.fit_transform(np.asarray(features, dtype=np.float64)), perplexity


# ------------------------------------------------------------------------------ the document


def image_rows(units, expert, classifications, spot_counts, baseline_threshold, threshold):
    rows = []
    for k, (unit, label) in enumerate(zip(units, expert)):
        row = {"key": image_key(unit.path, unit.file_index), "file": unit.path, "index": unit.file_index,
               "expert": label, "cnn": {}}
        for name, classification in classifications.items():
            record = classification.records[k]
            p = record.probabilities
            row["cnn"][name] = {
                "probabilities": list(p) if p else None,
                "class": record.predicted_class,
                "decision": record.decision,
                "error": record.error,
            }
        if spot_counts is not None:
            row["spots"] = int(spot_counts[k])
            row["baseline_decision"] = "Hit" if spot_counts[k] >= baseline_threshold else "Miss"
        rows.append(row)
    return rows


def recompute_run(run, threshold, baseline_threshold=None):
    """The run's analyses recomputed from its per-image records (what the tests compare with)."""
    out = {"cnn": {}}
    for name in run["cnn"]:
        ok = [row for row in run["images"] if row["cnn"][name]["decision"] != "error"]
        out["cnn"][name] = cnn_analysis([r["expert"] for r in ok],
                                        [r["cnn"][name]["probabilities"] for r in ok], threshold)
    if baseline_threshold is not None and "baseline" in run:
        rows = [row for row in run["images"] if "spots" in row]
        out["baseline"] = baseline_analysis([r["expert"] for r in rows], [r["spots"] for r in rows],
                                            baseline_threshold)
    return out


def new_document(threshold, models, baseline=None):
    import dials_cnn

    return {
        "format": DOCUMENT_FORMAT,
        "version": DOCUMENT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dials_cnn_version": getattr(dials_cnn, "__version__", None),
        "threshold": threshold,
        "models": models,
        "baseline": baseline,
        "runs": [],
        "follow_ups": list(FOLLOW_UPS),
    }


def write_json(path, document):
    with atomic_write(path) as handle:
        json.dump(document, handle, indent=1, allow_nan=False)
        handle.write("\n")


# ------------------------------------------------------------------------------ figures


def _png(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(width=6.0, height=3.6, ncols=1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots(1, ncols) if ncols > 1 else figure.subplots()
    return figure, axes


def plot_spot_counts(histogram, title):
    figure, ax = _figure()
    edges = np.asarray(histogram["edges"])
    for label in LABELS:
        ax.stairs(histogram["counts"][label], edges, label=label.title(), color=CLASS_COLOURS[label], linewidth=1.5)
    ax.axvline(histogram["threshold"], color="#0000cc", linestyle="--", label=f"threshold {histogram['threshold']}")
    ax.set_xlabel("spots found by dials.find_spots")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return _png(figure)


def plot_confidence(confidence, title):
    figure, axes = _figure(8.0, 3.2, ncols=2)
    bins = np.asarray(confidence["bins"])
    for ax, key, text, colour in ((axes[0], "miss", "P(Miss) of correct Miss", CLASS_COLOURS["MISS"]),
                                  (axes[1], "hit_maybe", "P(Hit)+P(Maybe) of correct Hit/Maybe", CLASS_COLOURS["HIT"])):
        part = confidence[key]
        ax.stairs(part["counts"], bins, fill=True, color=colour, alpha=0.7)
        mean = "-" if part["mean"] is None else "%.3f" % part["mean"]
        ax.set_title(f"{text}\nn = {part['n']}, mean = {mean}", fontsize=9)
        ax.set_xlabel("probability")
    axes[0].set_ylabel("images")
    figure.suptitle(title, fontsize=10, y=1.08)
    return _png(figure)


def plot_calibration(calibration_result, title):
    figure, ax = _figure(4.2, 3.6)
    rows = [r for r in calibration_result["bins"] if r["n"]]
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.plot([r["mean_predicted"] for r in rows], [r["observed"] for r in rows], "o-", color="#1f77b4")
    for r in rows:
        ax.annotate(str(r["n"]), (r["mean_predicted"], r["observed"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    ax.set_xlabel("mean P(Hit)+P(Maybe) in bin")
    ax.set_ylabel("fraction expert Hit or Maybe")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    return _png(figure)


def plot_operating_curves(run, threshold, baseline_threshold):
    figure, ax = _figure(5.0, 4.0)
    for name, analysis in run["cnn"].items():
        curve = analysis["operating_curve"]
        line, = ax.plot([c["keep_rate"] for c in curve], [c["hit_maybe_recall"] for c in curve], label=f"CNN {name}")
        point = min(curve, key=lambda c: abs(c["threshold"] - threshold))
        ax.plot(point["keep_rate"], point["hit_maybe_recall"], "o", color=line.get_color())
    if "baseline" in run:
        curve = run["baseline"]["operating_curve"]
        ax.plot([c["keep_rate"] for c in curve], [c["hit_maybe_recall"] for c in curve], color="black",
                linestyle="--", label="spot count")
        point = [c for c in curve if c["threshold"] == baseline_threshold]
        if point:
            ax.plot(point[0]["keep_rate"], point[0]["hit_maybe_recall"], "s", color="black")
    ax.set_xlabel("fraction of images kept")
    ax.set_ylabel("Hit+Maybe recall")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("keep rate vs hit recall (markers: chosen thresholds)", fontsize=9)
    return _png(figure)


def plot_tsne(tsne):
    figure, ax = _figure(5.0, 4.4)
    xy = np.asarray(tsne["coordinates"])
    labels = np.asarray(tsne["expert"])
    for label in LABELS:
        inside = labels == label
        if inside.any():
            ax.scatter(xy[inside, 0], xy[inside, 1], s=10, color=CLASS_COLOURS[label], label=label.title())
    ax.legend(fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {tsne['n_features']} features (perplexity {tsne['perplexity']:.1f})", fontsize=9)
    return _png(figure)


def plot_saliency(array, salient, caption):
    figure, ax = _figure(3.0, 3.2)
    low, high = np.percentile(array, [1, 99.5])
    ax.imshow(np.clip(array, low, high), cmap="gray_r", interpolation="nearest")
    overlay = np.zeros(array.shape + (4,))
    overlay[salient] = (1.0, 0.0, 0.0, 0.8)
    ax.imshow(overlay, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(caption, fontsize=7)
    return _png(figure)


# ------------------------------------------------------------------------------ HTML


def _get(document, path):
    value = document
    for part in path.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def format_value(value, kind):
    """How the report shows a value: ``count``, ``percent`` (of a fraction), ``rate`` (images/s),
    ``seconds`` or ``number``."""
    if value is None:
        return "-"
    if kind == "count":
        return "%d" % value
    if kind == "percent":
        return "%.1f %%" % (100 * value)
    if kind == "rate":
        return "%.1f" % value
    if kind == "seconds":
        return "%.2f" % value
    if kind == "number":
        return "%.3f" % value
    return html.escape(str(value))


class _Html:
    """Cells that name the JSON value they show (``data-json``), so a test can check every one."""

    def __init__(self, document):
        self.document = document
        self.parts = []

    def cell(self, path, kind, tag="td"):
        value = _get(self.document, path)
        return f'<{tag} data-json="{html.escape(path)}" data-kind="{kind}">{format_value(value, kind)}</{tag}>'

    def add(self, text):
        self.parts.append(text)

    def image(self, png, alt):
        self.add(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">')


_STYLE = """
body{font-family:Helvetica,Arial,sans-serif;margin:0 2em 2em 2em;color:#222;max-width:1200px}
h1{background:#2c3e50;color:white;padding:.5em;margin:0 -1em 1em -1em}
h2{border-bottom:2px solid #2c3e50;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 1.5em .5em 0;display:inline-table;vertical-align:top}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}
td.text{text-align:left}
th{background:#eef2f5}
caption{font-weight:bold;text-align:left;padding:.2em 0}
.figs img{margin:.3em;vertical-align:top;border:1px solid #ddd}
.note{color:#555;font-size:.9em}
"""


def _table3_html(h, base, caption):
    rows = ["expert Hit or Maybe", "expert Miss"]
    out = [f"<table><caption>{html.escape(caption)}</caption><tr><th></th><th>Hit</th><th>Miss</th></tr>"]
    for i, row in enumerate(rows):
        cells = "".join(h.cell(f"{base}/counts/{i}/{j}", "count") for j in range(2))
        out.append(f"<tr><th>{row}</th>{cells}</tr>")
    out.append("<tr><th>Hit+Maybe recall</th>" + h.cell(f"{base}/hit_maybe_recall", "percent") + "<td></td></tr>")
    out.append("<tr><th>Miss specificity</th><td></td>" + h.cell(f"{base}/miss_specificity", "percent") + "</tr>")
    out.append("<tr><th>success rate</th>" + h.cell(f"{base}/success_rate", "percent") + "<td></td></tr>")
    out.append("<tr><th>keep rate</th>" + h.cell(f"{base}/keep_rate", "percent") + "<td></td></tr></table>")
    return "".join(out)


def render_html(document, saliency_images=None):
    """The self-contained report. ``saliency_images``: {run name: [(png base64, caption)]}."""
    saliency_images = saliency_images or {}
    h = _Html(document)
    h.add("<!DOCTYPE html><html><head><meta charset='utf-8'><title>dials.cnn_evaluate report</title>"
          f"<style>{_STYLE}</style></head><body><h1>dials.cnn_evaluate: CNN screening versus spot counting</h1>")
    h.add(f"<p class='note'>Created {html.escape(document['created'])}; dials_cnn "
          f"{html.escape(str(document['dials_cnn_version']))}. CNN decision: Hit if P(Hit)+P(Maybe) &gt; "
          f"{document['threshold']}.")
    baseline = document.get("baseline")
    if baseline:
        h.add(f" Baseline: dials.find_spots (preset {html.escape(str(baseline['preset']))}), Hit if spots &ge; "
              f"{baseline['threshold']}.")
    h.add("</p>")
    h.add("<h2>Models</h2><table><tr><th>name</th><th>file</th><th>architecture</th><th>preprocessing</th></tr>")
    for model in document["models"]:
        h.add("<tr>" + "".join(f"<td class='text'>{html.escape(str(model.get(k)))}</td>"
                               for k in ("name", "path", "architecture"))
              + f"<td class='text'>{html.escape(json.dumps(model.get('preprocess')))}</td></tr>")
    h.add("</table>")

    h.add("<h2>Speed on the same images</h2><table><tr><th>run</th><th>images</th><th>method</th>"
          "<th>seconds</th><th>images/s</th></tr>")
    for r, run in enumerate(document["runs"]):
        for name in run["cnn"]:
            h.add(f"<tr><td>{html.escape(run['name'])}</td>" + h.cell(f"runs/{r}/n_images", "count")
                  + f"<td>CNN {html.escape(name)}</td>" + h.cell(f"runs/{r}/cnn/{name}/timing/seconds", "seconds")
                  + h.cell(f"runs/{r}/cnn/{name}/timing/images_per_second", "rate") + "</tr>")
        if "baseline" in run:
            h.add(f"<tr><td>{html.escape(run['name'])}</td>" + h.cell(f"runs/{r}/n_images", "count")
                  + "<td>dials.find_spots</td>" + h.cell(f"runs/{r}/baseline/timing/seconds", "seconds")
                  + h.cell(f"runs/{r}/baseline/timing/images_per_second", "rate") + "</tr>")
    h.add("</table><p class='note'>CNN time includes reading and preprocessing; both methods ran in this "
          "process, one after the other, with the nproc / thread settings listed under Parameters.</p>")

    if "cross_dataset" in document:
        cross = document["cross_dataset"]
        h.add("<h2>Success rate of each model on each run (paper Tables 4-6)</h2><table><tr><th>model \\ run</th>"
              + "".join(f"<th>{html.escape(r)}</th>" for r in cross["runs"]) + "</tr>")
        for m, model in enumerate(cross["models"]):
            h.add(f"<tr><th>{html.escape(model)}</th>"
                  + "".join(h.cell(f"cross_dataset/success_rate/{m}/{r}", "percent") for r in range(len(cross["runs"])))
                  + "</tr>")
        if "baseline_success_rate" in cross:
            h.add("<tr><th>spot count baseline</th>" + "".join(
                h.cell(f"cross_dataset/baseline_success_rate/{r}", "percent") for r in range(len(cross["runs"])))
                + "</tr>")
        h.add("</table>")

    threshold = document["threshold"]
    for r, run in enumerate(document["runs"]):
        base = f"runs/{r}"
        h.add(f"<h2>Run {html.escape(run['name'])}</h2><p class='note'>{run['n_images']} annotated images "
              f"({html.escape(json.dumps(run['expert_counts']))}) from {html.escape(run['annotation_file'])}; "
              f"{run['n_errors']} unreadable image(s) left out.</p>")
        h.add("<h3>Agreement with the expert (paper Table 3)</h3>")
        for name in run["cnn"]:
            h.add(_table3_html(h, f"{base}/cnn/{name}/table3", f"CNN {name}"))
        if "baseline" in run:
            h.add(_table3_html(h, f"{base}/baseline/table3", f"spot count >= {run['baseline']['threshold']}"))
        for name, analysis in run["cnn"].items():
            c = f"{base}/cnn/{name}"
            h.add(f"<h3>CNN {html.escape(name)}: three classes</h3>")
            h.add("<table><caption>expert (rows) / most probable class (columns)</caption><tr><th></th>"
                  + "".join(f"<th>{label}</th>" for label in LABELS) + "</tr>")
            for i, label in enumerate(LABELS):
                h.add(f"<tr><th>{label}</th>" + "".join(h.cell(f"{c}/three_class/counts/{i}/{j}", "count")
                                                        for j in range(3)) + "</tr>")
            h.add("<tr><th>accuracy</th>" + h.cell(f"{c}/three_class/accuracy", "percent")
                  + "<td></td><td></td></tr></table>")
            h.add("<table><caption>per class (one versus rest)</caption><tr><th></th><th>recall</th>"
                  "<th>specificity</th><th>precision</th></tr>")
            for label in LABELS:
                h.add(f"<tr><th>{label}</th>" + "".join(h.cell(f"{c}/per_class/{label}/{k}", "percent")
                                                        for k in ("recall", "specificity", "precision")) + "</tr>")
            h.add("</table><table><caption>calibration of P(Hit)+P(Maybe)</caption>"
                  "<tr><th>expected calibration error</th>"
                  + h.cell(f"{c}/calibration/expected_calibration_error", "percent")
                  + "</tr><tr><th>Brier score</th>" + h.cell(f"{c}/calibration/brier_score", "number")
                  + "</tr></table>")
            h.add("<div class='figs'>")
            h.image(plot_confidence(analysis["confidence"], f"{run['name']}: confidence of correct classifications "
                                    "(paper Fig. 9)"), "confidence histograms")
            h.image(plot_calibration(analysis["calibration"], f"{run['name']}: calibration"), "calibration")
            h.add("</div>")
        h.add("<h3>Operating point</h3><div class='figs'>")
        baseline_threshold = run["baseline"]["threshold"] if "baseline" in run else None
        h.image(plot_operating_curves(run, threshold, baseline_threshold), "keep rate versus hit recall")
        if "baseline" in run:
            h.image(plot_spot_counts(run["baseline"]["spot_counts"], f"{run['name']}: spot counts per expert class "
                                     "(paper Fig. 7)"), "spot count histogram")
        h.add("</div>")
        if run.get("tsne"):
            h.add("<h3>Features the last layer sees (paper Fig. 11)</h3><div class='figs'>")
            h.image(plot_tsne(run["tsne"]), "t-SNE")
            h.add("</div>")
        if run.get("studies"):
            h.add(_studies_html(h, f"{base}/studies", run["studies"]))
        if saliency_images.get(run["name"]):
            h.add("<h3>Saliency: |dL/dx| beyond 3 sigma, in red, over the network input (paper Fig. 10)</h3>"
                  "<div class='figs'>")
            for png, caption in saliency_images[run["name"]]:
                h.image(png, caption)
            h.add("</div>")

    h.add("<h2>Parameters</h2>")
    if baseline:
        h.add(f"<p>Spotfinder parameters differing from dials.find_spots' defaults:</p>"
              f"<pre>{html.escape(baseline.get('spotfinder_phil') or '(none)')}</pre>")
    h.add(f"<pre>{html.escape(document.get('parameters', ''))}</pre>")
    if document["follow_ups"]:
        h.add("<h2>Not in this report yet</h2><ul>"
              + "".join(f"<li>{html.escape(t)}</li>" for t in document["follow_ups"]) + "</ul>")
    h.add("</body></html>")
    return "\n".join(h.parts)


def _studies_html(h, base, studies):
    split = studies["split"]
    parts = [f"<p class='note'>Models trained from scratch on this run (architecture and preprocessing of the "
             f"first model, {studies['recipe']['epochs']} epochs of {studies['recipe']['batches_per_epoch']} "
             f"batches); split 50/20/30 with seed {split['seed']}: {split['train']} / {split['validation']} / "
             f"{split['test']}; all tested on the same {split['test']} test images.</p>"]
    columns = ("training_images", "success_rate", "hit_maybe_recall", "miss_specificity", "train_seconds")
    kinds = ("count", "percent", "percent", "percent", "seconds")
    header = ("<tr><th>training images</th><th>success rate</th><th>Hit+Maybe recall</th>"
              "<th>Miss specificity</th><th>train s</th></tr>")
    for key, title, first in (("training_size", "Training-size study (paper Table 7)", None),
                              ("contrast", "LCN versus linear contrast (paper Table 8)", "contrast")):
        if not studies.get(key):
            continue
        parts.append(f"<h3>{title}</h3><table>" + (header.replace("<tr>", "<tr><th>contrast</th>", 1) if first else header))
        for i, row in enumerate(studies[key]):
            cells = "".join(h.cell(f"{base}/{key}/{i}/{c}", k) for c, k in zip(columns, kinds))
            lead = f"<td class='text'>{html.escape(row['contrast'])}</td>" if first else ""
            parts.append(f"<tr>{lead}{cells}</tr>")
        parts.append("</table>")
    return "".join(parts)


def write_html(path, document, saliency_images=None):
    text = render_html(document, saliency_images)
    with atomic_write(path) as handle:
        handle.write(text)
    return text


# ------------------------------------------------------------------------------ the whole evaluation


def evaluate(units, annotation_files, models, threshold=0.5, baseline_params=None, baseline_threshold=None,
             baseline_preset=None, spotfinder_phil="", batch_size=16, nproc=1, saliency_per_class=2,
             tsne=True, tsne_max_images=2000, studies=None, log=None):
    """Run the CNN(s) and the baseline on the annotated ``units``; return ``(document, saliency_images)``.

    ``studies``: keyword arguments of :func:`dials_cnn.studies.run_studies` (``training_sizes``,
    ``contrast``, ``recipe``, ``seed``) to train the paper's Table 7 / Table 8 models on each run.

    ``models``: ``{name: ScreeningModel}`` (the first one gets saliency maps and t-SNE).
    ``baseline_params``: extracted ``dials.find_spots`` parameters (:func:`dials_cnn.baseline.spotfinder_params`),
    or None to leave the baseline out.
    """
    from dials_cnn.baseline import count_spots

    log = log or (lambda text: None)
    runs, unannotated = match_annotations(units, annotation_files)
    if unannotated:
        log(f"{len(unannotated)} image(s) have no expert label and are left out")
    model_info = [{"name": name, "path": model.path, "architecture": model.architecture,
                   "preprocess": model.preprocess.to_dict()} for name, model in models.items()]
    baseline = None
    if baseline_params is not None:
        baseline = {"preset": baseline_preset, "threshold": int(baseline_threshold), "spotfinder_phil": spotfinder_phil,
                    "nproc": int(baseline_params.spotfinder.mp.nproc)}
    document = new_document(threshold, model_info, baseline)
    saliency_images = {}
    primary = next(iter(models))
    for name, annotation_file, members in runs:
        run_units = [unit for unit, _ in members]
        expert = [label for _, label in members]
        log(f"Run {name}: {len(run_units)} annotated images")
        classifications, features = {}, None
        for model_name, model in models.items():
            classification, model_features = classify_with_features(run_units, model, threshold, batch_size, nproc)
            classifications[model_name] = classification
            if model_name == primary:
                features = model_features
            seconds = classification.seconds["total"]
            log(f"  CNN {model_name}: {len(run_units)} images in {seconds:.2f} s "
                f"({len(run_units) / seconds if seconds > 0 else float('inf'):.1f} images/s)")
        errors = {k for c in classifications.values() for k, r in enumerate(c.records) if r.decision == "error"}
        keep = [k for k in range(len(run_units)) if k not in errors]
        spot_counts, spot_finding_failed = None, {}
        if baseline is not None:
            counted = count_spots([run_units[k] for k in keep], baseline_params)
            spot_counts = np.zeros(len(run_units), dtype=np.int64)
            spot_counts[keep] = counted.counts
            log(f"  dials.find_spots: {len(keep)} images in {counted.seconds:.2f} s "
                f"({counted.images_per_second:.1f} images/s)")
            spot_finding_failed = counted.failed
            if counted.failed:
                log(f"  dials.find_spots failed on {len(counted.failed)} image(s), counted as no spots (Miss):\n"
                    + "\n".join(f"    {why}" for why in counted.failed.values()))
        rows = image_rows(run_units, expert, classifications, spot_counts,
                          baseline["threshold"] if baseline else None, threshold)
        for position, why in spot_finding_failed.items():
            rows[keep[position]]["spot_finding_error"] = why
        for k in errors:
            rows[k].pop("spots", None)
            rows[k].pop("baseline_decision", None)
        kept_expert = [expert[k] for k in keep]
        run = {
            "name": name,
            "annotation_file": os.path.abspath(annotation_file),
            "n_images": len(keep),
            "n_errors": len(errors),
            "expert_counts": {label: kept_expert.count(label) for label in LABELS},
            "images": rows,
            "cnn": {},
        }
        for model_name, classification in classifications.items():
            probabilities = [classification.records[k].probabilities for k in keep]
            analysis = cnn_analysis(kept_expert, probabilities, threshold)
            seconds = classification.seconds["total"]
            analysis["timing"] = {"seconds": seconds, "images": len(run_units),
                                  "images_per_second": len(run_units) / seconds if seconds > 0 else None,
                                  "stages": dict(classification.seconds), "nproc": nproc}
            run["cnn"][model_name] = analysis
        if baseline is not None:
            run["baseline"] = baseline_analysis(kept_expert, spot_counts[keep], baseline["threshold"])
            run["baseline"]["timing"] = {"seconds": counted.seconds, "images": len(keep),
                                         "images_per_second": _nan_to_none(counted.images_per_second),
                                         "nproc": baseline["nproc"]}
        if tsne and features is not None:
            chosen = np.asarray(keep)
            if len(chosen) > tsne_max_images:
                chosen = np.sort(np.random.default_rng(0).choice(chosen, tsne_max_images, replace=False))
            embedded = tsne_embedding(features[chosen]) if len(chosen) else None
            if embedded is not None:
                xy, perplexity = embedded
                run["tsne"] = {"images": [int(k) for k in chosen], "expert": [expert[k] for k in chosen],
                               "coordinates": xy.round(4).tolist(), "perplexity": perplexity,
                               "n_features": int(features.shape[1])}
        run["saliency"] = []
        saliency_images[name] = []
        model = models[primary]
        records = classifications[primary].records
        for k in pick_saliency_images(expert, records, saliency_per_class):
            result = saliency(run_units[k], model, expert[k])
            if result is None:
                continue
            array, gradient, salient = result
            record = records[k]
            entry = {"image": k, "key": rows[k]["key"], "expert": expert[k], "cnn_class": record.predicted_class,
                     "cnn_decision": record.decision, "salient_pixels": int(salient.sum()),
                     "salient_fraction": float(salient.mean())}
            run["saliency"].append(entry)
            p_hit_maybe = record.probabilities[0] + record.probabilities[1]
            caption = (f"{os.path.basename(run_units[k].path)} [{run_units[k].file_index + 1}] expert {expert[k]}, "
                       f"CNN {record.predicted_class}, {record.decision} (P(H)+P(M)={p_hit_maybe:.2f})")
            saliency_images[name].append((plot_saliency(array, salient, caption), caption))
        if studies:
            from dials_cnn.studies import run_studies

            run["studies"] = run_studies([run_units[k] for k in keep], kept_expert, model, nproc=nproc,
                                         threshold=threshold, log=log, **studies)
        document["runs"].append(run)
    document["cross_dataset"] = cross_dataset(document)
    document["unannotated_images"] = len(unannotated)
    return document, saliency_images
