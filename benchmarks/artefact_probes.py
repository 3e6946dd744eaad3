"""What an artefact alone does to the models' decisions (issue 4): paired probes.

Each probe draws randomised shots (the ``make default-model`` mix, a seed of its own) and renders every
shot twice with the same generator state: once without the artefact and once with it, all else equal
(crystal, orientation, background, noise draws; the simulator fits spot brightness to the shot's
target count on the background it has, so a shot's label can move with the artefact). Then every model
scores both renderings. Printed per probe and model: the share kept (P(HIT) + P(MAYBE) > threshold)
of blank misses (no visible spot), of misses with 1-3 visible spots, of MAYBEs and of HITs (shots in
the same group with and without the artefact), without -> with the artefact. A model a spot counter could fool keeps more misses with the artefact.

Probes:

* ``jet_streak``: a liquid-jet streak at a random angle (5-300 photons per pixel at 10 px from the
  beam, 60-500 px long, 0.6-1.6 px wide), on shots with the sample in the beam;
* ``beamstop``: a beam-stop shadow drawn as the simulator draws it (a 0.5-4 mm disc, an arm to the edge
  on 70 %, transmission 0.003-0.15, penumbra 0.5-3 px), on Rayonix, Pilatus and Eiger shots;
* ``ice_rings``: ice rings drawn as the simulator draws them, on shots with the sample in the beam.

    /usr/bin/python3 benchmarks/artefact_probes.py default work_data/w30/default_model.pt --shots 600
"""

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time

import numpy as np

PROBES = ("jet_streak", "beamstop", "ice_rings")
GROUPS = ("blank misses", "misses with 1-3 spots", "MAYBEs", "HITs")


def _log_uniform(rng, low, high):
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def with_artefact(probe, shot, preset, rng):
    """``shot`` with the probe's artefact drawn from ``rng``, or None where it does not apply."""
    if not shot.pulse:
        return None
    if probe == "jet_streak" and shot.sample_in_beam:
        return dataclasses.replace(shot, jet_streak=(float(rng.uniform(-90.0, 90.0)), _log_uniform(rng, 5.0, 300.0),
                                                     float(rng.uniform(60.0, 500.0)), float(rng.uniform(0.6, 1.6))))
    if probe == "beamstop" and shot.family != "cspad":
        px = shot.pixel_size_mm
        arm = rng.random() < preset.beamstop_arm_probability
        return dataclasses.replace(shot, beamstop=(
            _log_uniform(rng, *preset.beamstop_radius_mm) / px, float(rng.uniform(0.0, 360.0)),
            float(rng.uniform(*preset.beamstop_arm_width_mm)) / px if arm else 0.0,
            _log_uniform(rng, *preset.beamstop_transmission), float(rng.uniform(0.5, 3.0))))
    if probe == "ice_rings" and shot.sample_in_beam:
        return dataclasses.replace(shot, ice_rings=(
            _log_uniform(rng, *preset.ice_ring_photons), _log_uniform(rng, *preset.ice_ring_width),
            _log_uniform(rng, 0.3, 5.0) if rng.random() < 0.5 else 0.0))
    return None


_WORKER = {}


def _init_worker(preprocess_dicts, seed):
    import torch

    from dials_cnn.preprocess import PreprocessParams

    torch.set_num_threads(1)
    _WORKER.update(preprocess=[PreprocessParams.from_dict(d) for d in preprocess_dicts], seed=seed)


def _render_pair(job):
    """(probe, index) -> None, or (group without, group with, [per preprocessing: (input without, with)])."""
    from dials_cnn.default_model import PRESET_NAMES
    from dials_cnn.presets import PRESETS
    from dials_cnn.preprocess import prepare
    from dials_cnn.projection import flat_from_array
    from dials_cnn.simulate import image_rng, sample_shot, simulate_still

    probe, index = job
    seed = _WORKER["seed"] * 10 + PROBES.index(probe)
    rng = image_rng(seed, index)
    base = PRESETS[PRESET_NAMES[index % len(PRESET_NAMES)]]
    shot = sample_shot(base, rng, randomise=True, vary_beam_centre=True)
    # the artefact's own draws come from another generator: the rendering's stays the same for both
    probed = with_artefact(probe, dataclasses.replace(shot, **{probe: None}), base, image_rng(seed + 1, index))
    if probed is None:
        return None
    state = rng.bit_generator.state
    groups, inputs = [], [[] for _ in _WORKER["preprocess"]]
    for variant in (dataclasses.replace(shot, **{probe: None}), probed):
        rendering = np.random.default_rng()
        rendering.bit_generator.state = state
        still = simulate_still(variant, rendering)
        n = still.truth["n_visible_spots"]
        groups.append({"HIT": 3, "MAYBE": 2}.get(still.truth["label"], 0 if n == 0 else 1))
        flat = flat_from_array(still.image, still.beam_centre_px, still.pixel_size_mm, still.mask)
        for k, params in enumerate(_WORKER["preprocess"]):
            inputs[k].append(prepare(flat, params).astype(np.float16))
    return groups, inputs


def run_probe(probe, models, shots, seed, nproc, threshold, log):
    """{model name: {group: [n, kept without, kept with]}} for one probe."""
    from dials_cnn.model import CLASS_NAMES
    from dials_cnn.training import predict_inputs

    preprocess = [m.preprocess.to_dict() for m in models.values()]
    pairs, started = [], time.time()
    context = multiprocessing.get_context("fork")
    with context.Pool(nproc, initializer=_init_worker, initargs=(preprocess, seed)) as pool:
        for n, pair in enumerate(pool.imap(_render_pair, [(probe, i) for i in range(shots)], chunksize=2)):
            if pair is not None:
                pairs.append(pair)
            if (n + 1) % 100 == 0 or n + 1 == shots:
                rate = (n + 1) / (time.time() - started)
                log(f"  {probe}: {n + 1}/{shots} shots ({len(pairs)} probed), {rate:.1f} shots/s, "
                    f"ETA {(shots - n - 1) / rate:.0f} s")
    groups = np.array([g for g, _ in pairs], dtype=np.int64).reshape(-1, 2)
    result = {}
    for k, (name, model) in enumerate(models.items()):
        kept = []
        for variant in (0, 1):
            x = np.stack([inputs[k][variant] for _, inputs in pairs]) if pairs else np.zeros((0, 1, 1), np.float16)
            p = predict_inputs(model.network, x, model.preprocess.crop)
            kept.append(1.0 - p[:, CLASS_NAMES.index("MISS")] > threshold)
        table = {}
        for g, group in enumerate(GROUPS):
            # the same group with and without: a miss the artefact made a MAYBE is not a false keep
            chosen = (groups[:, 0] == g) & (groups[:, 1] == g)
            table[group] = [int(chosen.sum())] + [round(100 * float(kept[v][chosen].mean()), 1) if chosen.any()
                                                  else None for v in (0, 1)]
        result[name] = table
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model files, or 'default' / 'fast' for the shipped ones")
    parser.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES))
    parser.add_argument("--shots", type=int, default=600, help="randomised shots drawn per probe")
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from dials_cnn import default_model
    from dials_cnn.model import load_model

    torch.set_num_threads(args.nproc)
    log = lambda line: print(line, flush=True)  # noqa: E731
    models = {name: load_model(default_model.shipped_model_path(name)) for name in args.models}
    results = {probe: run_probe(probe, models, args.shots, args.seed, args.nproc, args.threshold, log)
               for probe in args.probes}
    log(f"\nKept (P(HIT) + P(MAYBE) > {args.threshold}), without -> with the artefact:")
    for probe, by_model in results.items():
        counts = next(iter(by_model.values()))
        log(f"{probe}: " + ", ".join(f"{n} {group}" for group, (n, _, _) in counts.items()))
        for name, table in by_model.items():
            log(f"  {name}: " + "; ".join(f"{group} {a} -> {b} %" for group, (_, a, b) in table.items()))
    if args.json:
        from dials_cnn.fileio import atomic_write

        with atomic_write(args.json) as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    sys.exit(main())
