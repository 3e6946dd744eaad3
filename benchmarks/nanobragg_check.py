"""The shipped models on stills from an independent simulator, James Holton's nanoBragg.

The project's own simulator (dials_cnn.simulate) made the models' training data, so a test on its
stills cannot show what the models learnt about that simulator rather than about diffraction. This
script makes ``--per-detector`` stills per detector type with nanoBragg (an external binary, built
by the user) and scores ``dials.cnn_classify`` and the ``dials.find_spots`` baseline on them against
an expert-style rule computed on the noise-free images.

Images. Three detector types: Pilatus-like (0.172 mm, 1000x1000, counts), Rayonix-like 2x2-binned
(0.178 mm, 960x960, gain 1-3 ADU/photon, read noise 1.5-4 ADU, offset 10) and a CSPAD-like single
flat panel (0.110 mm, 1700x1700, gain 7-30, read noise 0.2-0.5 photon, offset 40). Per detector a
third each of HIT, MAYBE and MISS, a third of the MISS water only. Four cells (lysozyme,
thermolysin, a trypsin-like 55-68 A cell, a 205x205x150 A cell); P1 structure factors from cctbx,
acentric Wilson amplitudes times exp(-B s^2/4), Friedel mates equal, turned once into nanoBragg
dump files under DIR/hkl. Each still is two nanoBragg runs in the same geometry (lambda 1.0-1.8 A,
distance 80-250 mm, beam +-20 px off centre, random misset, mosaic 0.02-0.2 deg):

* the crystal without water (``-water 0``): the noise-free spot-only image. -Na/-Nb/-Nc are chosen
  so that spots are 0.8-3 px wide (3-40 cells). nanoBragg's output is exactly linear in -fluence,
  so it runs once at 1e24 photons/m^2 and its image is then scaled; the scale is found by bisection
  (capped at 1e30 photons/m^2) so that the rule's count lands in the image's target class;
* water without crystal (``-default_F 1e-30 -N 1``): the noise-free background. This run has its own
  fluence: nanoBragg treats ``-water T`` as a fully illuminated cube of side T, which at the
  crystal's XFEL fluence gives 1e6-1e11 photons/px. The water fluence is set instead so that the
  background at the detector centre is a drawn 0.05-3 (Pilatus, CSPAD) or 0.5-15 (Rayonix)
  photons/px, i.e. a path T through a beam much narrower than the cube.

Then photons = Poisson(spots + water), ADU = gain * photons + N(0, read noise) + offset, rounded and
clipped to 0-65535 (numpy, not nanoBragg's -noisefile).

The rule (ground truth), on the noise-free spot-only image: spots are the 8-connected components of
the pixels above 0.05 photon and above 5 % of the 7x7 local maximum; a spot counts if its centroid is
in the expert window (x in beam +-472.5 px, y in beam -442..+78 px) and it is visible:
S >= max(4, 5 sqrt(A (b + r^2) + 1)) (S summed photons, A area in px, b mean water background on it,
r read noise in photons). HIT >= 10 visible spots, MAYBE 4-9, MISS < 4.

Files. The stills are SMV files with this script's own ADSC-style header, read by dxtbx as
FormatSMVADSCSN. nanoBragg's own SMV header says BEAMLINE=fake, so dxtbx reads it as FormatSMVJHSim,
which takes the MOSFLM-convention BEAM_CENTER_X/Y as ADXV values (the beam comes out with the axes
swapped and the slow axis flipped), assumes an ADC offset of 1 and needs a number in the file name.

Scoring. Per detector type: ``dials.import ... convert_sequences_to_stills=True``, then
``dials.cnn_classify model=<m>`` for each of ``--models``; and ``dials.find_spots`` (in-process,
dials_cnn.baseline) one image at a time with that image's gain as
spotfinder.threshold.dispersion.gain: with one gain for all, it aborts on Rayonix and CSPAD stills
("number of strong pixels ... greater than the maximum allowed"). Images on which it still aborts
(some Rayonix ones: Gaussian read noise is over-dispersed for its Poisson test) count as no spots and
are listed. Prints, per detector and overall: n per class, per model Hit+Maybe recall, Miss
specificity (P(HIT)+P(MAYBE) > --threshold), ROC AUC, MAYBE recall and the 3x3 confusion matrix
(rows: rule label, columns: CNN argmax class); for find_spots recall/specificity at >= 30 spots and
the AUC of the spot count. Results: DIR/labels.csv, DIR/<det>/..., DIR/nanobragg_check.json.

nanoBragg: source https://github.com/bl831/nanoBragg (nanoBragg.c), built with
``gcc -O3 -o nanoBragg nanoBragg.c -lm -fopenmp``. Everything is deterministic from --seed.

    /usr/bin/python3 benchmarks/nanobragg_check.py --nanobragg /path/to/nanoBragg
    /usr/bin/python3 benchmarks/nanobragg_check.py --nanobragg /path/to/nanoBragg --per-detector 6 --out /tmp/small
"""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

NANOBRAGG_HELP = ("the source is https://github.com/bl831/nanoBragg (nanoBragg.c); build it with\n"
                  "  gcc -O3 -o nanoBragg nanoBragg.c -lm -fopenmp\n"
                  "and pass --nanobragg /path/to/nanoBragg")

# name: (unit cell, d_min in A, Wilson B in A^2)
CELLS = {
    "lyso": ((79.1, 79.1, 37.9, 90, 90, 90), 1.6, 25),
    "thermo": ((92.8, 92.8, 130.3, 90, 90, 120), 2.0, 35),
    "tryp": ((54.9, 58.4, 67.5, 90, 90, 90), 1.6, 20),
    "large": ((205.0, 205.0, 150.0, 90, 90, 90), 3.0, 50),
}
# pixel mm, pixels per side, gain ADU/photon, read noise (ADU; CSPAD: photons), offset ADU,
# water background at the centre in photons/px
DETECTORS = {
    "pilatus": dict(pixel=0.172, npix=1000, gain=(1.0, 1.0), read=(0.0, 0.0), offset=0, background=(0.05, 3.0)),
    "rayonix": dict(pixel=0.178, npix=960, gain=(1.0, 3.0), read=(1.5, 4.0), offset=10, background=(0.5, 15.0)),
    "cspad": dict(pixel=0.110, npix=1700, gain=(7.0, 30.0), read=(0.2, 0.5), offset=40, background=(0.05, 3.0)),
}
CLASSES = ("HIT", "MAYBE", "MISS")
REFERENCE_FLUENCE = 1e24  # photons/m^2 of every nanoBragg run; the images are scaled afterwards
MAX_FLUENCE = 1e30  # above it the few images that needed more were mostly saturated
ATTEMPTS = 8  # draws per image until its rule label is the target class (the last one is kept)
FIND_SPOTS_THRESHOLD = 30
LABEL_COLUMNS = (
    "file", "detector", "index", "seed", "target", "kind", "spot_count", "spots_in_window_any", "label", "cell", "lam",
    "distance", "pixel", "npix", "beam_fast_px", "beam_slow_px", "Na", "Nb", "Nc", "shape", "mosaic", "domains",
    "oversample", "misset_seed", "fluence_xtal", "water_um", "fluence_water", "bg_centre_ph", "gain",
    "read_noise_adu", "read_noise_ph", "offset", "max_photons", "sat_pixels", "cmd_xtal", "cmd_water",
)


class NanoBragg:
    """The external nanoBragg binary, run in a scratch folder with ``threads`` OpenMP threads."""

    def __init__(self, path, work_dir, threads):
        self.path = path
        self.work_dir = work_dir
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        os.makedirs(work_dir, exist_ok=True)

    def run(self, args):
        """Run with ``args``; return the beam centre (fast, slow) in mm that nanoBragg reports."""
        result = subprocess.run([self.path] + args, capture_output=True, text=True, env=self.env, cwd=self.work_dir)
        found = re.search(r"Fbeam=(\S+) Sbeam=(\S+)", result.stdout)
        if result.returncode != 0 or not found:
            raise SystemExit(f"nanoBragg failed (exit {result.returncode}): {self.path} {' '.join(args)}\n"
                             f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return 1000 * float(found.group(1)), 1000 * float(found.group(2))  # nanoBragg prints metres

    def output_args(self, name):
        return ["-floatfile", os.path.join(self.work_dir, name + ".bin"),
                "-intfile", os.path.join(self.work_dir, name + "_int.img")]

    def image(self, args, name, npix):
        """The float image (photons/px) of a run writing ``name`` in the scratch folder, and the beam."""
        beam = self.run(args + self.output_args(name))
        return np.fromfile(os.path.join(self.work_dir, name + ".bin"), dtype=np.float32).reshape(npix, npix), beam


def structure_factors(name, seed, hkl_dir, nanobragg):
    """The nanoBragg dump file of cell ``name``: P1 hkl file from cctbx (Wilson amplitudes), then dumped."""
    from cctbx import crystal

    cell, d_min, b_factor = CELLS[name]
    hkl = os.path.join(hkl_dir, f"{name}_seed{seed}.hkl")
    dump = os.path.join(hkl_dir, f"{name}_seed{seed}.bin")
    if os.path.exists(dump):
        return dump  # deterministic from the seed
    rng = np.random.default_rng([seed, 1000 + list(CELLS).index(name)])
    miller_set = crystal.symmetry(unit_cell=cell, space_group_symbol="P1").build_miller_set(
        anomalous_flag=True, d_min=d_min)
    indices = np.array(miller_set.indices().as_vec3_double().as_numpy_array(), dtype=np.int64)
    d = np.array(miller_set.d_spacings().data())
    amplitudes = np.abs(rng.normal(size=len(d)) + 1j * rng.normal(size=len(d))) / np.sqrt(2)
    amplitudes *= 100.0 * np.exp(-b_factor / (4 * d * d))
    # Friedel mates get the amplitude of the first of the pair (nanoBragg has no anomalous signal anyway)
    span = 2 * np.abs(indices).max() + 1
    keys = ((indices[:, 0] + span) * 3 * span + indices[:, 1] + span) * 3 * span + indices[:, 2] + span
    mate_keys = ((-indices[:, 0] + span) * 3 * span - indices[:, 1] + span) * 3 * span - indices[:, 2] + span
    order = np.argsort(keys)
    mates = order[np.clip(np.searchsorted(keys[order], mate_keys), 0, len(keys) - 1)]
    first = (keys[mates] == mate_keys) & (mates > np.arange(len(keys)))
    amplitudes[mates[first]] = amplitudes[first]
    os.makedirs(hkl_dir, exist_ok=True)
    np.savetxt(hkl + ".tmp", np.column_stack([indices, amplitudes]), fmt="%d %d %d %.3f")
    os.replace(hkl + ".tmp", hkl)
    nanobragg.run(["-hkl", hkl, "-dump", dump, "-cell"] + [str(x) for x in cell]
                  + ["-N", "3", "-detpixels", "10", "-nonoise", "-nopgm", "-noprogress",
                     "-floatfile", "/dev/null", "-intfile", os.path.join(nanobragg.work_dir, "junk.img")])
    print(f"  structure factors {name}: {len(indices)} reflections to {d_min} A -> {dump}", flush=True)
    return dump


def rule_counts(xtal, water, beam_px, read_noise_ph, scale):
    """(visible spots, all spots) in the expert window of the noise-free spot image ``xtal * scale``."""
    from scipy import ndimage

    cx, cy = beam_px
    n = xtal.shape[0]
    x0, x1 = max(0, int(np.floor(cx - 472.5)) - 3), min(n, int(np.ceil(cx + 472.5)) + 3)
    y0, y1 = max(0, int(np.floor(cy - 442)) - 3), min(n, int(np.ceil(cy + 78)) + 3)
    spots = xtal[y0:y1, x0:x1] * scale
    background = water[y0:y1, x0:x1]
    mask = (spots > 0.05) & (spots > 0.05 * ndimage.maximum_filter(spots, size=7))
    labels, n_labels = ndimage.label(mask, structure=np.ones((3, 3)))
    if n_labels == 0:
        return 0, 0
    index = np.arange(1, n_labels + 1)
    summed = ndimage.sum(spots, labels, index)
    area = ndimage.sum(np.ones_like(spots), labels, index)
    mean_background = ndimage.mean(background, labels, index)
    centroids = np.array(ndimage.center_of_mass(spots, labels, index)).reshape(-1, 2)
    yy, xx = centroids[:, 0] + y0 + 0.5, centroids[:, 1] + x0 + 0.5
    in_window = (xx >= cx - 472.5) & (xx <= cx + 472.5) & (yy >= cy - 442) & (yy <= cy + 78)
    visible = summed >= np.maximum(4, 5 * np.sqrt(area * (mean_background + read_noise_ph ** 2) + 1))
    return int((visible & in_window).sum()), int(in_window.sum())


def rule_label(visible_spots):
    return "HIT" if visible_spots >= 10 else ("MAYBE" if visible_spots >= 4 else "MISS")


def fluence_scale(xtal, water, beam_px, read_noise_ph, target, rng):
    """Scale of the spot image (x REFERENCE_FLUENCE) whose rule count is in ``target``'s range, by
    log bisection; returns (scale, visible spots, all spots)."""
    if target == "HIT":
        hi = int(np.exp(rng.uniform(np.log(15), np.log(600))))
        lo = max(10, int(0.6 * hi))
    elif target == "MAYBE":
        lo = hi = int(rng.integers(4, 10))
    else:
        lo, hi = 0, int(rng.integers(0, 4))
    low, high = 1e-2, MAX_FLUENCE / REFERENCE_FLUENCE
    for _ in range(40):
        scale = np.sqrt(low * high)
        visible, anywhere = rule_counts(xtal, water, beam_px, read_noise_ph, scale)
        if lo <= visible <= hi:
            return scale, visible, anywhere
        if visible < lo:
            low = scale
        else:
            high = scale
        if high / low < 1.001:
            break
    return (low,) + rule_counts(xtal, water, beam_px, read_noise_ph, low)  # not reached: the retry decides


def write_smv(path, adu, pixel, distance, wavelength, beam_fast_mm, beam_slow_mm, pedestal):
    """ADSC-style SMV that dxtbx reads as FormatSMVADSCSN (BEAM_CENTER_X is the slow axis)."""
    header = ("{\nHEADER_BYTES=  512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n"
              f"SIZE1={adu.shape[1]};\nSIZE2={adu.shape[0]};\nPIXEL_SIZE={pixel};\nBIN=none;\nADC=fast;\n"
              "DETECTOR_SN=999;\nDATE=Mon Dec  1 12:00:00 2025;\nTIME=0.01;\n"
              f"DISTANCE={distance:.3f};\nOSC_RANGE=0.000;\nPHI=0.000;\nOSC_START=0.000;\nTWOTHETA=0.000;\n"
              f"AXIS=phi;\nWAVELENGTH={wavelength:.5f};\nBEAM_CENTER_X={beam_slow_mm:.4f};\n"
              f"BEAM_CENTER_Y={beam_fast_mm:.4f};\nIMAGE_PEDESTAL={pedestal};\n}}")
    with open(path + ".tmp", "wb") as handle:
        handle.write(header.encode().ljust(512, b" "))
        handle.write(adu.astype("<u2").tobytes())
    os.replace(path + ".tmp", path)


def image_plan(detector, n_images, seed):
    """The target of each image of ``detector``: a third HIT, MAYBE, MISS; a third of the MISS water only."""
    n_hit = n_maybe = n_images // 3
    n_miss = n_images - n_hit - n_maybe
    n_water = n_miss // 3
    plan = ["water"] * n_water + ["HIT"] * n_hit + ["MAYBE"] * n_maybe + ["MISS"] * (n_miss - n_water)
    np.random.default_rng([seed, list(DETECTORS).index(detector)]).shuffle(plan)
    return plan


def simulate_still(detector, index, target, seed, nanobragg, dumps, image_dir):
    """Make one still aimed at ``target`` (HIT, MAYBE, MISS or water); returns (its labels row, retries)."""
    spec = DETECTORS[detector]
    pixel, npix = spec["pixel"], spec["npix"]
    # one generator per image, so that --reuse regenerates the others unchanged
    rng = np.random.default_rng([seed, list(DETECTORS).index(detector), index])
    want = "MISS" if target == "water" else target
    for attempt in range(ATTEMPTS):
        cell_name = str(rng.choice(list(CELLS)))
        cell = CELLS[cell_name][0]
        wavelength, distance = rng.uniform(1.0, 1.8), rng.uniform(80, 250)
        offset_fast, offset_slow = rng.uniform(-20, 20, 2)
        fast_mm, slow_mm = (npix / 2 + offset_fast) * pixel, (npix / 2 + offset_slow) * pixel
        spot_width = rng.uniform(0.8, 3.0)  # pixels
        cells_n = [int(np.clip(round(wavelength * distance / (spot_width * a * pixel)), 3, 40)) for a in cell[:3]]
        shape = str(rng.choice(["-round_xtal", "-square_xtal"], p=[0.4, 0.6]))
        mosaic = rng.uniform(0.02, 0.2)
        max_steps = 6 if detector == "cspad" else 8  # sub-pixel steps x domains: bounds the run time
        oversample = 2 if (spot_width < 1.2 and detector != "cspad") else 1
        domains = int(rng.integers(1, max(2, max_steps // (oversample * oversample)) + 1))
        water_um = rng.uniform(50, 200)
        background = np.exp(rng.uniform(np.log(spec["background"][0]), np.log(spec["background"][1])))
        gain = rng.uniform(*spec["gain"])
        read_adu = rng.uniform(*spec["read"]) * (gain if detector == "cspad" else 1.0)
        if detector == "pilatus":
            gain, read_adu = 1.0, 0.0
        read_ph = read_adu / gain
        misset_seed = int(rng.integers(1, 10 ** 6))
        # MOSFLM convention in nanoBragg: Fbeam = Ybeam + pixel/2
        geometry = ["-lambda", f"{wavelength:.4f}", "-distance", f"{distance:.2f}", "-pixel", str(pixel),
                    "-detpixels", str(npix), "-Xbeam", f"{slow_mm - 0.5 * pixel:.4f}",
                    "-Ybeam", f"{fast_mm - 0.5 * pixel:.4f}", "-nonoise", "-nopgm", "-noprogress"]

        def water_args(fluence):
            return (["-cell"] + [str(x) for x in cell]
                    + ["-default_F", "1e-30", "-dump", "/nonexistent", "-N", "1", "-nointerpolate", "-oversample",
                       "1", "-water", f"{water_um:.1f}", "-fluence", fluence] + geometry)

        def xtal_args(fluence):
            return (["-dump", dumps[cell_name], "-cell"] + [str(x) for x in cell]
                    + ["-misset", "random", "-misset_seed", str(misset_seed), "-Na", str(cells_n[0]),
                       "-Nb", str(cells_n[1]), "-Nc", str(cells_n[2]), shape, "-nointerpolate",
                       "-mosaic", f"{mosaic:.3f}", "-mosaic_domains", str(domains), "-mosaic_seed",
                       str(misset_seed + 1), "-oversample", str(oversample), "-water", "0", "-fluence", fluence]
                    + geometry)

        water, (beam_fast_mm, beam_slow_mm) = nanobragg.image(water_args(f"{REFERENCE_FLUENCE:.3e}"), "water", npix)
        water_scale = background / water[npix // 2 - 5:npix // 2 + 5, npix // 2 - 5:npix // 2 + 5].mean()
        water *= water_scale
        beam_px = (beam_fast_mm / pixel, beam_slow_mm / pixel)
        xtal, scale, visible, anywhere, kind = 0.0, 0.0, 0, 0, "water_only"
        if target != "water":
            xtal, _ = nanobragg.image(xtal_args(f"{REFERENCE_FLUENCE:.3e}"), "xtal", npix)
            if xtal.max() > 0:
                kind = "crystal"
                scale, visible, anywhere = fluence_scale(xtal, water, beam_px, read_ph, target, rng)
        expected = xtal * scale + water
        photons = rng.poisson(expected).astype(np.float64)
        adu = photons * gain + (rng.normal(0, read_adu, photons.shape) if read_adu > 0 else 0) + spec["offset"]
        adu = np.clip(np.round(adu), 0, 65535).astype(np.uint16)
        label = rule_label(visible)
        if label == want or attempt == ATTEMPTS - 1:
            break
    path = os.path.join(image_dir, f"{detector}_{index:03d}.img")
    write_smv(path, adu, pixel, distance, wavelength, beam_fast_mm, beam_slow_mm, spec["offset"])
    row = dict(
        file=path, detector=detector, index=index, seed=seed, target=target, kind=kind, spot_count=visible,
        spots_in_window_any=anywhere, label=label, cell=cell_name, lam=round(wavelength, 4),
        distance=round(distance, 2), pixel=pixel, npix=npix, beam_fast_px=round(beam_px[0], 2),
        beam_slow_px=round(beam_px[1], 2), Na=cells_n[0], Nb=cells_n[1], Nc=cells_n[2], shape=shape,
        mosaic=round(mosaic, 3), domains=domains, oversample=oversample, misset_seed=misset_seed,
        fluence_xtal=f"{REFERENCE_FLUENCE * scale:.4e}", water_um=round(water_um, 1),
        fluence_water=f"{REFERENCE_FLUENCE * water_scale:.4e}", bg_centre_ph=round(background, 3),
        gain=round(gain, 3), read_noise_adu=round(read_adu, 3), read_noise_ph=round(read_ph, 3),
        offset=spec["offset"], max_photons=float(np.max(expected)), sat_pixels=int((adu >= 65535).sum()),
        # the command lines with the fluence the image corresponds to (they ran at REFERENCE_FLUENCE)
        cmd_xtal=(" ".join(["nanoBragg"] + xtal_args(f"{REFERENCE_FLUENCE * scale:.4e}")
                           + nanobragg.output_args("xtal")) if kind == "crystal" else ""),
        cmd_water=" ".join(["nanoBragg"] + water_args(f"{REFERENCE_FLUENCE * water_scale:.4e}")
                           + nanobragg.output_args("water")),
    )
    return row, attempt


def read_labels(path):
    if not os.path.exists(path):
        return {}
    with open(path, newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def write_labels(path, rows):
    """labels.csv, replaced in one step so that an interrupted run never leaves half a file."""
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


def generate_images(args, nanobragg):
    """Every still of every detector type, with its labels row (reusing existing ones with --reuse)."""
    hkl_dir = os.path.join(args.out, "hkl")
    dumps = {name: structure_factors(name, args.seed, hkl_dir, nanobragg) for name in CELLS}
    labels_path = os.path.join(args.out, "labels.csv")
    existing = read_labels(labels_path) if args.reuse else {}
    plans = {det: image_plan(det, args.per_detector, args.seed) for det in DETECTORS}
    total = sum(len(plan) for plan in plans.values())
    rows, done, made, retries, started = [], 0, 0, 0, time.time()
    for detector, plan in plans.items():
        image_dir = os.path.join(args.out, "images", detector)
        os.makedirs(image_dir, exist_ok=True)
        for index, target in enumerate(plan):
            path = os.path.join(image_dir, f"{detector}_{index:03d}.img")
            old = existing.get(path)
            if old is not None and os.path.exists(path) and (old["seed"], old["target"]) == (str(args.seed), target):
                rows.append(old)
                done += 1
                continue
            row, retried = simulate_still(detector, index, target, args.seed, nanobragg, dumps, image_dir)
            rows.append(row)
            # after each still, so that an interrupted run can be resumed with --reuse
            write_labels(labels_path, rows + [r for p, r in existing.items() if p not in {x["file"] for x in rows}])
            done, made, retries = done + 1, made + 1, retries + retried
            rate = made / (time.time() - started)
            print(f"  [{done}/{total}] {os.path.basename(path)} target {target}: {row['label']} "
                  f"({row['spot_count']} visible spots{f', {retried} redraws' if retried else ''}); "
                  f"{rate:.2f} images/s, ETA {(total - done) / rate:.0f} s", flush=True)
    write_labels(labels_path, rows)  # exactly this run's images
    print(f"{total} stills ({made} made, {total - made} reused, {retries} redraws) in "
          f"{time.time() - started:.0f} s; labels: {labels_path}", flush=True)
    for row in rows:  # numbers as numbers, whether made now or read back
        for key in ("spot_count", "index"):
            row[key] = int(row[key])
        row["gain"] = float(row["gain"])
    return rows


def dials(command, cwd):
    """Run a DIALS command line in ``cwd``, its console output in ``<command>.out`` there."""
    log = os.path.join(cwd, f"{command[0]}.out")
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} failed (exit {result.returncode}) in {cwd}: see {log}\n"
                         f"  command: {' '.join(command)}")


def model_name(model):
    return model if "/" not in model and not model.endswith(".pt") else os.path.splitext(os.path.basename(model))[0]


def classify(detector_dir, model, args):
    """P(HIT)+P(MAYBE) and argmax class per file from ``dials.cnn_classify model=<model>``."""
    output_dir = os.path.join(detector_dir, model_name(model))
    os.makedirs(output_dir, exist_ok=True)
    # each model's outputs in a folder of its own
    dials(["dials.cnn_classify", os.path.join(detector_dir, "imported.expt"), f"model={model}",
           f"threshold={args.threshold}", f"nproc={args.nproc}"], output_dir)
    with open(os.path.join(output_dir, "cnn_classification.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    out = {}
    for row in rows:
        if row.get("error"):  # an unreadable image: scored as a confident miss, and reported
            out[row["file"]] = (0.0, "ERROR")
        else:
            out[row["file"]] = (float(row["p_hit"]) + float(row["p_maybe"]), row["class"])
    return out


def find_spots(detector_dir, gains):
    """Strong spots per file, ``dials.find_spots`` one image at a time with that image's gain;
    returns (counts, {file: why it aborted})."""
    from dxtbx.model.experiment_list import ExperimentListFactory

    from dials_cnn import baseline
    from dials_cnn.classify import image_units

    units = image_units(ExperimentListFactory.from_json_file(os.path.join(detector_dir, "imported.expt")))
    counts, aborted = {}, {}
    for unit in units:
        params = baseline.spotfinder_params(overrides=[f"spotfinder.threshold.dispersion.gain={gains[unit.path]}"])
        counted = baseline.count_spots([unit], params, max_failed_fraction=1.0)  # a refused image: 0 spots
        counts[unit.path] = int(counted.counts[0])
        if counted.failed:
            aborted[unit.path] = counted.failed[0].split(" failed (", 1)[-1][:-1]
    with open(os.path.join(detector_dir, "find_spots.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "n_spots", "aborted"])
        for path, n in counts.items():
            writer.writerow([path, n, aborted.get(path, "")])
    return counts, aborted


def score_detector(detector, rows, args):
    """Import the stills of ``detector`` and run every model and the find_spots baseline on them;
    returns {method: {file: (score, class or None)}} and the files find_spots aborted on."""
    detector_dir = os.path.join(args.out, detector)
    os.makedirs(detector_dir, exist_ok=True)
    files = sorted(row["file"] for row in rows)
    dials(["dials.import"] + files + ["convert_sequences_to_stills=True", "output.experiments=imported.expt"],
          detector_dir)
    scores = {}
    for model in args.models:
        started = time.time()
        scores[f"CNN {model_name(model)}"] = classify(detector_dir, model, args)
        print(f"  {detector}: dials.cnn_classify model={model} {len(files) / (time.time() - started):.1f} "
              "images/s (start-up included)", flush=True)
    started = time.time()
    counts, aborted = find_spots(detector_dir, {row["file"]: row["gain"] for row in rows})
    print(f"  {detector}: dials.find_spots {len(files) / (time.time() - started):.1f} images/s, "
          f"aborted on {len(aborted)}", flush=True)
    scores["find_spots"] = {path: (float(n), None) for path, n in counts.items()}
    return scores, aborted


def metrics(rows, scores, threshold):
    """Hit+Maybe recall and Miss specificity at ``threshold``, ROC AUC, MAYBE recall and the confusion
    matrix (rule label x argmax class) of one method on ``rows``."""
    from sklearn.metrics import roc_auc_score

    labels = np.array([row["label"] for row in rows])
    score = np.array([scores[row["file"]][0] for row in rows])
    predicted = [scores[row["file"]][1] for row in rows]
    positive, called = labels != "MISS", score > threshold
    result = {
        "hit_maybe_recall": float(called[positive].mean()) if positive.any() else float("nan"),
        "miss_specificity": float((~called[~positive]).mean()) if (~positive).any() else float("nan"),
        "auc": float(roc_auc_score(positive, score)) if 0 < positive.sum() < len(rows) else float("nan"),
        "hit_recall": float(called[labels == "HIT"].mean()) if (labels == "HIT").any() else float("nan"),
        "maybe_recall": float(called[labels == "MAYBE"].mean()) if (labels == "MAYBE").any() else float("nan"),
    }
    if predicted[0] is not None:
        result["confusion"] = [[sum(1 for l, p in zip(labels, predicted) if l == truth and p == cls)
                                for cls in CLASSES] for truth in CLASSES]
        result["errors"] = int(sum(p == "ERROR" for p in predicted))
    return result


def evaluate(rows, scores, threshold):
    """Metrics per detector type and overall, per method."""
    results = {}
    for group in list(DETECTORS) + ["all"]:
        subset = [row for row in rows if group in ("all", row["detector"])]
        entry = {"n": {cls: sum(row["label"] == cls for row in subset) for cls in CLASSES}, "methods": {}}
        for method in scores:
            if method == "find_spots":
                entry["methods"][f"find_spots >={FIND_SPOTS_THRESHOLD}"] = metrics(
                    subset, scores[method], FIND_SPOTS_THRESHOLD - 0.5)
            else:
                entry["methods"][method] = metrics(subset, scores[method], threshold)
        results[group] = entry
    return results


def print_tables(results, aborted, args):
    print(f"\nnanoBragg stills, {args.per_detector} per detector type, seed {args.seed}. Recall: Hit+Maybe "
          f"images with P(HIT)+P(MAYBE) > {args.threshold} (find_spots: >= {FIND_SPOTS_THRESHOLD} spots); "
          "spec: Miss images below it; AUC: ROC AUC of P(HIT)+P(MAYBE) (find_spots: of the spot count) for "
          "label in {HIT, MAYBE}; n: HIT/MAYBE/MISS by the rule.\n")
    print("| detector | n | method | Hit+Maybe recall | Miss spec | AUC | HIT recall | MAYBE recall |")
    print("|---|---|---|---|---|---|---|---|")
    for group, entry in results.items():
        n = "/".join(str(entry["n"][cls]) for cls in CLASSES)
        for method, m in entry["methods"].items():
            print(f"| {group} | {n} | {method} | {m['hit_maybe_recall']:.3f} | {m['miss_specificity']:.3f} | "
                  f"{m['auc']:.3f} | {m['hit_recall']:.3f} | {m['maybe_recall']:.3f} |")
    for method, m in results["all"]["methods"].items():
        if "confusion" not in m:
            continue
        unreadable = f"; {m['errors']} unreadable, class ERROR" if m["errors"] else ""
        print(f"\n{method}: rows = rule label, columns = CNN argmax class (all detectors{unreadable})")
        print("| label | HIT | MAYBE | MISS |\n|---|---|---|---|")
        for truth, line in zip(CLASSES, m["confusion"]):
            print(f"| {truth} | " + " | ".join(str(v) for v in line) + " |")
        print("  per detector: " + "; ".join(f"{g} {results[g]['methods'][method]['confusion']}" for g in DETECTORS))
    n_aborted = sum(len(v) for v in aborted.values())
    print(f"\ndials.find_spots aborted on {n_aborted} image(s), counted as no spots"
          + (":" if n_aborted else "."))
    for detector, files in aborted.items():
        for path, why in files.items():
            print(f"  {os.path.basename(path)}: {why}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanobragg", required=True, help="the nanoBragg binary (see below how to build it)")
    parser.add_argument("--out", default="nanobragg_check", help="output folder (default nanobragg_check)")
    parser.add_argument("--per-detector", type=int, default=51, help="stills per detector type (default 51)")
    parser.add_argument("--seed", type=int, default=2018, help="seed of everything (default 2018)")
    parser.add_argument("--models", default="default,fast",
                        help="comma-separated shipped model names or model files (default: default,fast)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the stills whose image file and labels row exist (same --seed and --per-detector)")
    parser.add_argument("--threshold", type=float, default=0.5, help="Hit if P(HIT)+P(MAYBE) > this (0.5)")
    parser.add_argument("--nproc", type=int, default=1, help="cores for nanoBragg and dials.cnn_classify (1)")
    args = parser.parse_args(argv)
    if not (os.path.isfile(args.nanobragg) and os.access(args.nanobragg, os.X_OK)):
        print(f"nanoBragg not found or not executable: {args.nanobragg}\n{NANOBRAGG_HELP}", file=sys.stderr)
        return 2
    args.nanobragg = os.path.abspath(args.nanobragg)
    args.out = os.path.abspath(args.out)
    args.models = [os.path.abspath(m) if os.path.exists(m) else m for m in args.models.split(",") if m]
    started = time.time()

    print(f"=== generating {args.per_detector} stills per detector type into {args.out} ===", flush=True)
    nanobragg = NanoBragg(args.nanobragg, os.path.join(args.out, "work"), args.nproc)
    rows = generate_images(args, nanobragg)
    generation_seconds = time.time() - started

    scores, aborted = {}, {}
    for detector in DETECTORS:
        print(f"=== scoring {detector} ===", flush=True)
        detector_rows = [row for row in rows if row["detector"] == detector]
        detector_scores, aborted[detector] = score_detector(detector, detector_rows, args)
        for method, values in detector_scores.items():
            scores.setdefault(method, {}).update(values)
    results = evaluate(rows, scores, args.threshold)
    print_tables(results, aborted, args)
    seconds = time.time() - started
    print(f"\n{time.time() - started:.0f} s in all ({generation_seconds:.0f} s generating the stills)")
    path = os.path.join(args.out, "nanobragg_check.json")
    with open(path + ".tmp", "w") as handle:
        json.dump({"args": vars(args), "results": results, "find_spots_aborted": aborted,
                   "seconds": {"total": seconds, "generation": generation_seconds}}, handle, indent=1)
    os.replace(path + ".tmp", path)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
