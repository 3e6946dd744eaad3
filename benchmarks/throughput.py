"""Throughput of dials.cnn_classify against dials.find_spots on the same simulated stills and cores.

For each detector family (CSPAD: L498, Rayonix: LO19) ``--images`` stills are simulated once
(``dials_cnn.simulate.simulate_run``) and cached in ``--cache``; then, one after the other on the same
files and the same ``--nproc`` cores:

* ``dials.cnn_classify imported.expt nproc=N`` end to end (read -> flatten -> preprocess -> CNN -> CSV,
  JSON, hits.expt), timed as a process (start-up included) and from inside the command, with its
  per-stage breakdown;
* ``dials.find_spots <experiments> <the run's spotfinder preset> spotfinder.mp.nproc=N``, then the
  spot-count threshold (dials_cnn.baseline), timed as processes: ``--find-spots-chunk`` experiments
  per process (250), one after the other, because one process holding 500 Rayonix stills' strong
  pixels needs more memory than this machine has;
* optionally (``--compare N``) the first N images through the straightforward path (whole flat image,
  plain network) to show the fast path's predictions are unchanged.

Prints images/s for both, their ratio, the per-stage breakdown and the peak memory (largest process,
including worker processes). Runs unchanged on a CUDA machine (``device=auto``).

    make benchmark
    /usr/bin/python3 benchmarks/throughput.py --images 100 --presets L498
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
FAMILY_PRESETS = {"cspad": "L498", "rayonix": "LO19"}


def measured(command, cwd, env=None):
    """Run ``command``; return (wall seconds, peak RSS in MiB of its largest process, stdout)."""
    # a fresh helper process per measurement, so RUSAGE_CHILDREN covers only this command's tree
    helper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
        "sys.stdout.write(r.stdout)\n"
        "print('@@ %d %f %d' % (r.returncode, time.perf_counter() - t,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    )
    result = subprocess.run([PYTHON, "-c", helper] + command, cwd=cwd, env=env, capture_output=True, text=True)
    lines = result.stdout.rstrip().splitlines()
    if not lines or not lines[-1].startswith("@@ "):
        raise SystemExit(f"{' '.join(command)} did not run:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    returncode, seconds, max_rss_kib = lines[-1].split()[1:]
    output = "\n".join(lines[:-1])
    if int(returncode) != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {returncode}):\n{output[-3000:]}")
    return float(seconds), int(max_rss_kib) / 1024.0, output


def simulated_run(preset, n_images, seed, cache, nproc):
    """The cached run folder of ``preset`` (simulated and imported on first use)."""
    from dials_cnn.simulate import simulate_run

    directory = os.path.abspath(os.path.join(cache, f"{preset}_n{n_images}_seed{seed}"))  # dials.import runs in it
    done = os.path.join(directory, "imported.expt")
    if not os.path.exists(done):
        print(f"Simulating {n_images} {preset} stills into {directory} (cached for later runs) ...", flush=True)
        t = time.perf_counter()
        summary = simulate_run(preset, n_images, seed, directory, nproc=nproc)
        print(f"  {summary['images_per_s']:.1f} images/s, {time.perf_counter() - t:.0f} s", flush=True)
        subprocess.run(["dials.import"] + [os.path.join(directory, f) for f in summary["files"]]
                       + ["output.experiments=imported.tmp.expt", "output.log=dials.import.log"],
                       cwd=directory, check=True, capture_output=True)
        os.replace(os.path.join(directory, "imported.tmp.expt"), done)
    return directory


def model_path(requested, cache):
    """The model to benchmark: --model, else the shipped default, else an untrained network with the
    default model's architecture and preprocessing (speed does not depend on the weights)."""
    from dials_cnn.default_model import shipped_model_path

    if requested:  # the commands run in the run's own folder: a relative path would not be found there
        path = shipped_model_path(requested)
        return (os.path.abspath(path) if os.path.exists(path) else path), "given"
    if os.path.exists(shipped_model_path()):
        return shipped_model_path(), "shipped default"
    import torch

    from dials_cnn.default_model import default_preprocess
    from dials_cnn.model import architecture_defaults, build_network, save_model

    preprocess = default_preprocess()
    kwargs = architecture_defaults("spotcount", preprocess)
    path = os.path.join(cache, f"untrained_spotcount_{preprocess.pipeline}{preprocess.crop}.pt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        save_model(path, build_network("spotcount", **kwargs), "spotcount", preprocess, kwargs)
    return path, "untrained stand-in (no default model installed)"


def spot_counts(refl_path, n_images):
    """Strong spots per image of a stills run (one experiment per image), from dials.find_spots'
    reflection file."""
    from dials.array_family import flex

    reflections = flex.reflection_table.from_file(refl_path)
    return np.bincount(reflections["id"].as_numpy_array().astype(np.int64), minlength=n_images)[:n_images]


def find_spots_in_chunks(run_dir, phil, args, env):
    """``dials.find_spots`` on the run, ``args.find_spots_chunk`` experiments per process, one process
    after the other on all ``args.nproc`` cores: in one process it holds every image's strong pixels
    until the end (~45 MB per 1920^2 Rayonix still: 500 of them exceed this machine's 24 GB).
    Returns (wall seconds summed, start-ups included; peak RSS of the largest; spots per image;
    number of processes)."""
    from dxtbx.model.experiment_list import ExperimentList, ExperimentListFactory

    experiments = ExperimentListFactory.from_json_file(os.path.join(run_dir, "imported.expt"), check_format=False)
    size = args.find_spots_chunk or len(experiments)
    wall, peak, counts, chunks = 0.0, 0.0, [], 0
    for start in range(0, len(experiments), size):
        chunk = ExperimentList(list(experiments[start : start + size]))
        name = f"find_spots_{start:06d}"
        chunk.as_file(os.path.join(run_dir, name + ".expt"))
        seconds, rss, _ = measured(["dials.find_spots", name + ".expt", phil, f"spotfinder.mp.nproc={args.nproc}",
                                    f"output.reflections={name}.refl", f"output.log={name}.log"], run_dir, env)
        t = time.perf_counter()
        counts.append(spot_counts(os.path.join(run_dir, name + ".refl"), len(chunk)))
        wall += seconds + time.perf_counter() - t
        peak, chunks = max(peak, rss), chunks + 1
    return wall, peak, np.concatenate(counts), chunks


def compare_straightforward(run_dir, model_file, n, device):
    """Decisions and probabilities of the first ``n`` images through the straightforward path,
    against the fast path's CSV."""
    import csv

    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_cnn.classify import classify_units, image_units
    from dials_cnn.model import load_model

    units = image_units(ExperimentListFactory.from_json_file(os.path.join(run_dir, "imported.expt")))[:n]
    reference = classify_units(units, load_model(model_file), optimise=False, device=device)
    with open(os.path.join(run_dir, "cnn", "cnn_classification.csv"), newline="") as handle:
        fast = {(row["file"], int(row["index"])): row for row in csv.DictReader(handle)}
    same, worst = 0, 0.0
    for record in reference.records:
        row = fast[(record.path, record.file_index)]
        same += row["decision"] == record.decision
        worst = max(worst, max(abs(float(row[k]) - p) for k, p in zip(("p_hit", "p_maybe", "p_miss"),
                                                                         record.probabilities)))
    return {"images": len(units), "identical_decisions": same / len(units), "max_probability_difference": worst}


def warm_page_cache(run_dir):
    """Read the run's image files once, so that both commands read them from memory: whichever ran
    first would otherwise pay for the disk (measured: read 28 ms per CSPAD still cold, 4 ms warm)."""
    started, size = time.perf_counter(), 0
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".h5"):
            with open(os.path.join(run_dir, name), "rb") as handle:
                while block := handle.read(1 << 24):
                    size += len(block)
    print(f"  page cache: read {size / 2**30:.1f} GiB of images in {time.perf_counter() - started:.0f} s "
          "before timing", flush=True)


def benchmark_preset(preset, args, model_file):
    from dials_cnn import baseline

    run_dir = simulated_run(preset, args.images, args.seed, args.cache, args.nproc)
    warm_page_cache(run_dir)
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    result = {"preset": preset, "images": args.images}

    # the workers read and preprocess on all cores; one torch thread for the network in the main
    # process (more would spin-wait for cores the workers use)
    cnn_args = ["dials.cnn_classify", "imported.expt", f"model={model_file}", f"nproc={args.nproc}",
                f"batch_size={args.batch_size}", f"device={args.device}", "nthreads=1", "output.directory=cnn"]
    wall, rss, _ = measured(cnn_args, run_dir, env)
    with open(os.path.join(run_dir, "cnn", "cnn_classification.json")) as handle:
        summary = json.load(handle)["summary"]
    seconds = summary["seconds"]
    result["cnn"] = {"seconds": wall, "command_seconds": seconds["total"], "peak_rss_mib": rss,
                     "images_per_s": args.images / wall, "command_images_per_s": args.images / seconds["total"],
                     "hits": summary["hits"],
                     "stages_ms": {k: 1000 * seconds.get(k, 0.0) / args.images
                                   for k in ("read", "projection", "preprocess", "network", "output")}}

    phil = os.path.join(run_dir, "spotfinder.phil")
    with open(phil, "w") as handle:
        handle.write(baseline.get_preset(preset).phil() + "\n")
    try:
        wall, rss, counts, chunks = find_spots_in_chunks(run_dir, phil, args, env)
    except SystemExit as failure:  # e.g. killed for memory: report it, keep the CNN's numbers
        print(f"  dials.find_spots failed: {str(failure).splitlines()[0]}", flush=True)
        result["find_spots"] = {"failed": str(failure).splitlines()[0], "images_per_s": float("nan"),
                                "peak_rss_mib": float("nan"), "hits": -1}
        result["ratio"] = float("nan")
        if args.compare:
            result["unchanged"] = compare_straightforward(run_dir, model_file, min(args.compare, args.images),
                                                          args.device)
        return result
    t = time.perf_counter()
    decisions = baseline.hit_decisions(counts, baseline.get_preset(preset).threshold)
    wall += time.perf_counter() - t
    result["find_spots"] = {"seconds": wall, "peak_rss_mib": rss, "images_per_s": args.images / wall,
                            "hits": int((decisions == "Hit").sum()), "processes": chunks}
    result["ratio"] = result["cnn"]["images_per_s"] / result["find_spots"]["images_per_s"]
    if args.compare:
        result["unchanged"] = compare_straightforward(run_dir, model_file, min(args.compare, args.images),
                                                      args.device)
    return result


def print_table(results, args, model_note):
    print()
    print(f"{args.images} stills per detector family, nproc={args.nproc} on {os.cpu_count()} CPU(s), "
          f"device={args.device}, model: {model_note}")
    header = ("| run | dials.cnn_classify img/s (in command) | dials.find_spots + threshold img/s | ratio | "
              "read | projection | preprocess | CNN | output (ms/image, all processes) | peak MiB CNN / find_spots |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        st = r["cnn"]["stages_ms"]
        print(f"| {r['preset']} | {r['cnn']['images_per_s']:.1f} ({r['cnn']['command_images_per_s']:.1f}) | "
              f"{r['find_spots']['images_per_s']:.1f} | "
              f"{r['ratio']:.1f}x | {st['read']:.1f} | {st['projection']:.1f} | {st['preprocess']:.1f} | "
              f"{st['network']:.1f} | {st['output']:.1f} | {r['cnn']['peak_rss_mib']:.0f} / "
              f"{r['find_spots']['peak_rss_mib']:.0f} |")
    for r in results:
        if "unchanged" in r:
            u = r["unchanged"]
            print(f"{r['preset']}: fast vs straightforward path on {u['images']} images: "
                  f"{100 * u['identical_decisions']:.1f} % identical decisions, "
                  f"max |dP| {u['max_probability_difference']:.1e}")
    print("(img/s: images / wall time of each process, start-up included; dials.find_spots: summed over "
          + ", ".join(f"{r['preset']} {r['find_spots'].get('processes', 1)}" for r in results)
          + " processes run one after the other; in brackets the CNN without start-up; hits: "
          + ", ".join(f"{r['preset']} CNN {r['cnn']['hits']} / find_spots {r['find_spots']['hits']}" for r in results)
          + ")")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500, help="stills per detector family (default 500)")
    parser.add_argument("--find-spots-chunk", type=int, default=250,
                        help="experiments per dials.find_spots process (0: all in one; default 250: 500 "
                             "Rayonix stills in one process need more than 24 GB)")
    parser.add_argument("--presets", nargs="+", default=list(FAMILY_PRESETS.values()),
                        help="simulation presets, one per detector family (default: L498 LO19)")
    parser.add_argument("--nproc", type=int, default=os.cpu_count(), help="cores for both (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--model", help="model file (default: the shipped default model)")
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--cache", default=os.path.join(ROOT, "work_data", "benchmark"),
                        help="folder of the simulated runs, reused by later runs")
    parser.add_argument("--compare", type=int, default=100,
                        help="images checked against the straightforward path (0: skip)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    model_file, model_note = model_path(args.model, args.cache)
    results = []
    for preset in args.presets:
        print(f"=== {preset} ===", flush=True)
        results.append(benchmark_preset(preset, args, model_file))
        r = results[-1]
        print(f"  dials.cnn_classify {r['cnn']['images_per_s']:.1f} images/s, dials.find_spots "
              f"{r['find_spots']['images_per_s']:.1f} images/s", flush=True)
    print_table(results, args, model_note)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "model": model_file, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
