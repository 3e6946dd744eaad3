"""Simulator throughput: images/s per core for each preset (and randomise=True), plus class shares.

    /usr/bin/python3 benchmarks/simulate_speed.py [--images 30] [--presets L498 LO19 ...] [--randomise]

Times ``simulate_still`` alone (the image engine, one process, one thread) and reports CPU-time
images/s, which is what one core delivers; wall-clock images/s is printed too, it is lower when
other jobs share the machine. Writing files adds HDF5 time on top (see dials.cnn_simulate's log).
"""

import argparse
import collections
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from dials_cnn import presets, simulate  # noqa: E402


def measure(preset, n_images, seed, randomise):
    shots = []
    for index in range(n_images + 1):
        rng = simulate.image_rng(seed, index)
        shots.append((simulate.sample_shot(preset, rng, randomise=randomise), rng))
    simulate.simulate_still(*shots[0])  # warm-up: noise pools, imports
    labels = collections.Counter()
    cpu, wall = time.process_time(), time.perf_counter()
    for shot, rng in shots[1:]:
        labels[simulate.simulate_still(shot, rng).truth["label"]] += 1
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return n_images / cpu, n_images / wall, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30, help="images per preset (default 30)")
    parser.add_argument("--presets", nargs="*", default=list(presets.PRESETS))
    parser.add_argument("--randomise", action="store_true", help="also time randomise=True")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rows = [(name, False) for name in args.presets] + ([("LO19", True)] if args.randomise else [])
    print("%-10s %-8s %12s %12s   %s" % ("preset", "family", "img/s (cpu)", "img/s (wall)", "HIT/MAYBE/MISS"))
    for name, randomise in rows:
        preset = presets.get_preset(name)
        per_cpu, per_wall, labels = measure(preset, args.images, args.seed, randomise)
        shares = "/".join("%d" % labels[label] for label in simulate.LABELS)
        print(
            "%-10s %-8s %12.1f %12.1f   %s"
            % ("random" if randomise else name, "mixed" if randomise else preset.family, per_cpu, per_wall, shares)
        )


if __name__ == "__main__":
    main()
