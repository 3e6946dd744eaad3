# LIBTBX_SET_DISPATCHER_NAME dials.cnn_simulate
"""Simulate labelled XFEL stills (CSPAD, Rayonix, ...) with expert annotations and a truth table."""

import logging
import os
import sys
import time

import iotbx.phil

import dials.util
import dials.util.log
from dials.util import Sorry
from dials.util.options import ArgumentParser

from dials_cnn.command_line import modified_parameters

logger = logging.getLogger("dials.cnn_simulate")

help_message = """
Simulate realistic serial-crystallography stills for one of the paper's runs (presets L498 and
LG36 on a CSPAD, LN84, LN83 and LO19 on a binned Rayonix) and label them by the expert's rule
(HIT >= 10 visible spots in the expert's inspection window, MAYBE 4-9, MISS otherwise).

Writes into output.directory:
  <prefix>.h5              the images (output.layout: idh5 as CXIDB id-76, raw_cspad, rayonix_binned)
  expert_annotation.txt    '<file> [<image number>] HIT|MAYBE|MISS' (fv5080 format)
  truth.csv                per image: visible spot count, crystal present, resolution limit, artefacts

randomise=True draws far beyond the preset (any detector family including Pilatus/Eiger-like
photon counters, 6-14 keV, cells 30-350 A, gains 0.1-20 ADU/photon, any artefact); it writes one
idh5 file per detector family. Image i depends only on (seed, i): any nproc gives identical files.
Every preset value can be changed with preset_override.<name>=<value> (see -c for the list).

Examples::

  dials.cnn_simulate preset=LO19 n_images=2000 seed=1 output.directory=run_lo19

  dials.cnn_simulate preset=L498 n_images=200 output.layout=raw_cspad nproc=2

  dials.cnn_simulate preset=LN84 n_images=100 preset_override.kapton_probability=0 \\
      preset_override.water_ring=10,20

  dials.cnn_simulate randomise=True n_images=5000 seed=7 output.directory=training
"""


def _override_phil():
    """One phil parameter per preset knob, all defaulting to None (= keep the preset's value)."""
    from dials_cnn.presets import PRESETS, preset_fields

    example = next(iter(PRESETS.values()))
    lines = []
    for name in preset_fields():
        value = getattr(example, name)
        if name == "family":
            lines.append(f"{name} = None cspad rayonix pilatus eiger\n  .type = choice")
            continue
        if isinstance(value, bool):
            phil_type = "bool"
        elif isinstance(value, tuple):
            phil_type = "floats"  # lengths are checked by presets.override, with a clear message
        elif isinstance(value, int):
            phil_type = "int"
        elif isinstance(value, str):
            phil_type = "str"
        else:  # floats and Optional[float]
            phil_type = "float"
        lines.append(f"{name} = None\n  .type = {phil_type}")
    return "\n".join(lines)


def _phil_scope():
    from dials_cnn.presets import PRESETS

    return iotbx.phil.parse(
        f"""\
preset = {' '.join(('*' if name == 'LO19' else '') + name for name in PRESETS)}
  .type = choice
  .help = "Run to imitate (paper Table 1): CSPAD L498, LG36; binned Rayonix LN84, LN83, LO19."
n_images = 100
  .type = int
  .help = "Number of stills to simulate."
seed = 0
  .type = int
  .help = "Random seed; image i uses numpy.random.default_rng([seed, i])."
randomise = False
  .type = bool
  .help = "Draw every parameter far beyond the preset (all detector families), for training."
nproc = 1
  .type = int
  .help = "Worker processes."
output {{
  directory = simulated
    .type = path
  layout = *idh5 raw_cspad rayonix_binned
    .type = choice
    .help = "idh5: CXIDB id-76 layout; raw_cspad: 64 ASICs per shot; rayonix_binned: binned Rayonix."
  prefix = None
    .type = str
    .help = "Image file name stem (default <preset>_seed<seed>)."
  chunk_size = 1000
    .type = int
    .help = "Images per HDF5 chunk group."
  log = dials.cnn_simulate.log
    .type = path
  png = False
    .type = bool
    .help = "Also save the expert's window of the first HIT, MAYBE and MISS as example_<LABEL>.png."
  png_contrast = 0.4
    .type = float(value_min=0.004, value_max=2)
    .help = "Viewer contrast M of the PNGs (dials.image_viewer: D = min(1, M P / P90))."
}}
preset_override
  .help = "Replace any value of the preset (ranges are two numbers: low,high)."
{{
{_override_phil()}
}}
"""
    )


phil_scope = _phil_scope()


def _overrides(params):
    changes = {}
    for name, value in vars(params.preset_override).items():
        if name.startswith("_") or value is None:
            continue
        changes[name] = tuple(value) if isinstance(value, list) else value
    return changes


def _format_seconds(seconds):
    seconds = int(round(seconds))
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


class _Progress:
    """Log progress about every 5 seconds (and at the end): count, images/s, ETA."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, done, total, rate):
        now = time.monotonic()
        if done == total or now - self.last >= 5.0:
            self.last = now
            eta = (total - done) / rate if rate > 0 else 0.0
            logger.info("%d/%d images, %.1f images/s, ETA %s", done, total, rate, _format_seconds(eta))


def save_examples(summary, preset, params):
    """PNG of the expert's window for the first image of each class (recomputed from its seed)."""
    import csv
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dials_cnn import simulate

    with open(summary["truth"]) as handle:
        rows = list(csv.DictReader(handle))
    written = []
    for label in simulate.LABELS:
        row = next((r for r in rows if r["label"] == label), None)
        if row is None:
            continue
        still = simulate.simulate_image(preset, params.seed, int(row["image"]), params.randomise)
        view = simulate.expert_window_view(still, params.output.png_contrast)
        path = os.path.join(summary["directory"], f"example_{label}.png")
        plt.imsave(path, 1.0 - view, cmap="gray", vmin=0.0, vmax=1.0)
        written.append(path)
    return written


@dials.util.show_mail_handle_errors()
def run(args=None):
    from dials_cnn import presets, simulate

    usage = "dials.cnn_simulate preset=LO19 n_images=2000 seed=1 output.directory=run_lo19 [options]"
    parser = ArgumentParser(usage=usage, phil=phil_scope, epilog=help_message)
    params, options = parser.parse_args(args, show_diff_phil=False)
    log_directory = os.path.dirname(os.path.abspath(params.output.log))
    try:
        os.makedirs(log_directory, exist_ok=True)
    except OSError as error:
        raise Sorry(f"Cannot write the log {params.output.log}: {error.strerror}; choose output.log=") from None
    dials.util.log.config(verbosity=options.verbose, logfile=params.output.log)
    diff = modified_parameters(phil_scope, params)
    if diff:
        logger.info("The following parameters have been modified:\n%s", diff)

    try:
        preset = presets.get_preset(params.preset)
        changes = _overrides(params)
        if changes:
            preset = presets.override(preset, **changes)
        simulate.check_run_parameters(
            preset, params.n_images, params.seed, params.output.directory,
            params.output.layout, params.randomise, params.nproc,
        )
    except (presets.PresetError, simulate.SimulationError) as error:
        raise Sorry(str(error)) from None
    if params.output.chunk_size is None or params.output.chunk_size < 1:
        raise Sorry(f"output.chunk_size must be at least 1, got {params.output.chunk_size}")

    logger.info(
        "Simulating %d %s stills (%s) into %s", params.n_images,
        "randomised" if params.randomise else preset.name, preset.description if not params.randomise else "all families",
        params.output.directory,
    )
    try:
        summary = simulate.simulate_run(
            preset,
            params.n_images,
            params.seed,
            params.output.directory,
            layout=params.output.layout,
            randomise=params.randomise,
            nproc=params.nproc,
            chunk_size=params.output.chunk_size,
            prefix=params.output.prefix,
            progress=_Progress(),
        )
    except (presets.PresetError, simulate.SimulationError) as error:
        raise Sorry(str(error)) from None
    except OSError as error:
        raise Sorry(f"cannot write into {params.output.directory}: {error}") from None

    if params.output.png:
        for path in save_examples(summary, preset, params):
            logger.info("Example: %s", path)
    total = sum(summary["counts"].values())
    logger.info("Class counts (expert rule):")
    for label in simulate.LABELS:
        count = summary["counts"][label]
        logger.info("  %-5s %6d  (%.1f%%)", label, count, 100.0 * count / total)
    logger.info("Images: %s", ", ".join(summary["files"]))
    logger.info("Annotation: %s", summary["annotation"])
    logger.info("Truth table: %s", summary["truth"])
    logger.info("%.1f images/s overall (%s)", summary["images_per_s"], _format_seconds(summary["seconds"]))


if __name__ == "__main__":
    run(sys.argv[1:])
