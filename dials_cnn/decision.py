"""Class probabilities -> decisions.

The paper's rule, Hit if P(HIT) + P(MAYBE) > P(MISS), is ``P(HIT) + P(MAYBE) > 0.5``; ``threshold``
moves that operating point (lower: fewer lost hits, more misses kept).
"""

import numpy as np

from dials_cnn.model import CLASS_NAMES

HIT, MAYBE, MISS = (CLASS_NAMES.index(name) for name in ("HIT", "MAYBE", "MISS"))


def hit_probability(probabilities):
    """P(HIT) + P(MAYBE) per image, from (N, 3) probabilities in ``CLASS_NAMES`` order."""
    probabilities = np.asarray(probabilities)
    return probabilities[:, HIT] + probabilities[:, MAYBE]


def hit_decisions(probabilities, threshold=0.5):
    """Bool per image: True = Hit (keep the image)."""
    return hit_probability(probabilities) > threshold


#: how far below the threshold a vetoed image counts as near it (the summary says how many there are)
NEAR_THRESHOLD = 0.2


def near_threshold_misses(probabilities, threshold=0.5):
    """Bool per image: vetoed, but with P(HIT) + P(MAYBE) within :data:`NEAR_THRESHOLD` of the
    threshold. On stills unlike the training data (another simulator's) the probabilities of real
    hits sat lower: these are the images a lower threshold would keep first."""
    p = hit_probability(probabilities)
    return (p <= threshold) & (p > max(threshold - NEAR_THRESHOLD, 0.0))


def decision_labels(probabilities, threshold=0.5):
    """"Hit" / "Miss" per image."""
    return np.where(hit_decisions(probabilities, threshold), "Hit", "Miss")


def argmax_classes(probabilities):
    """The most probable of HIT / MAYBE / MISS per image."""
    return np.asarray(CLASS_NAMES)[np.asarray(probabilities).argmax(axis=1)]
