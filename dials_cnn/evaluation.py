"""Agreement between a classifier and the expert, in the paper's terms (Table 3).

Expert classes are HIT / MAYBE / MISS. A veto is binary: "Hit" keeps the image, "Miss" drops it, so the
paper groups the expert's HIT and MAYBE together and reports row percentages of a 2x2 matrix:
Hit+Maybe recall (kept among the expert's hits and maybes) and Miss specificity (dropped among misses).
"""

import dataclasses

import numpy as np

from dials_cnn.annotations import LABELS

DECISIONS = ("Hit", "Miss")


@dataclasses.dataclass
class BinaryAgreement:
    """Counts of expert (Hit or Maybe | Miss) against decision (Hit | Miss)."""

    counts: np.ndarray  # 2x2: rows expert (hit-or-maybe, miss), columns decision (Hit, Miss)

    @property
    def n(self):
        return int(self.counts.sum())

    @property
    def recall(self):
        """Fraction of the expert's HIT + MAYBE images that are kept."""
        row = self.counts[0]
        return float(row[0] / row.sum()) if row.sum() else float("nan")

    @property
    def specificity(self):
        """Fraction of the expert's MISS images that are vetoed."""
        row = self.counts[1]
        return float(row[1] / row.sum()) if row.sum() else float("nan")

    @property
    def success_rate(self):
        return float(np.trace(self.counts) / self.n) if self.n else float("nan")

    @property
    def keep_rate(self):
        return float(self.counts[:, 0].sum() / self.n) if self.n else float("nan")

    def as_dict(self):
        return {
            "counts": self.counts.tolist(),
            "rows": ["expert Hit or Maybe", "expert Miss"],
            "columns": list(DECISIONS),
            "hit_maybe_recall": self.recall,
            "miss_specificity": self.specificity,
            "success_rate": self.success_rate,
            "keep_rate": self.keep_rate,
            "n_images": self.n,
        }

    def table(self, title="Expert / decision"):
        """The paper's Table 3 layout: row percentages with counts."""
        lines = [f"{title:<22}{'Hit':>16}{'Miss':>16}"]
        for name, row in zip(("Hit or Maybe", "Miss"), self.counts):
            total = max(int(row.sum()), 1)
            cells = "".join(f"{100 * c / total:>9.1f}% ({int(c):>4d})" for c in row)
            lines.append(f"{name:<22}{cells}")
        lines.append(
            f"Hit+Maybe recall {100 * self.recall:.1f} %, Miss specificity {100 * self.specificity:.1f} %, "
            f"success {100 * self.success_rate:.1f} % over {self.n} images"
        )
        return "\n".join(lines)


def binary_agreement(expert_labels, decisions):
    """``expert_labels`` in LABELS, ``decisions`` in DECISIONS (same length)."""
    counts = np.zeros((2, 2), dtype=np.int64)
    for label, decision in zip(expert_labels, decisions):
        row = 1 if label.upper() == "MISS" else 0
        column = DECISIONS.index(decision)
        counts[row, column] += 1
    return BinaryAgreement(counts)


def three_class_confusion(expert_labels, predicted_labels):
    """3x3 counts, rows expert, columns prediction, both in LABELS order."""
    counts = np.zeros((3, 3), dtype=np.int64)
    for expert, predicted in zip(expert_labels, predicted_labels):
        counts[LABELS.index(expert.upper()), LABELS.index(predicted.upper())] += 1
    return counts


def format_three_class(counts):
    lines = ["Expert / CNN".ljust(14) + "".join(f"{label:>8}" for label in LABELS)]
    for label, row in zip(LABELS, counts):
        lines.append(f"{label:<14}" + "".join(f"{int(c):>8d}" for c in row))
    return "\n".join(lines)
