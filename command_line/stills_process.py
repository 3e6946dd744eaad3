"""dials.cnn_stills_process: dials.stills_process with the CNN screen in front of spot finding."""

import logging

import dials.util
from dials.util.options import ArgumentParser

from dials_cnn.model import ModelError, load_model
from dials_cnn.default_model import shipped_model_path
from dials_cnn.prefilter import VetoScript, veto_phil_scope

logger = logging.getLogger("dials.cnn_stills_process")

help_message = """
dials.stills_process (import, spot finding, indexing, refinement and integration of each still) with
a convolutional-neural-network veto in front: each image is classified first, and an image the
network calls a Miss (P(HIT) + P(MAYBE) <= cnn_veto.threshold) is skipped before spot finding, so
no time is spent finding spots on, or trying to index, an empty shot.

Everything dials.stills_process accepts is accepted (input files, phil files, mp.method=mpi,
mp.nproc, output.*, spotfinder.*, indexing.*, ...), plus:

  cnn_veto.enable=True|False     switch the veto off to get plain dials.stills_process
  cnn_veto.model=model.pt        model written by dials.cnn_train (default: the shipped model)
  cnn_veto.threshold=0.5         lower keeps more images (fewer lost hits)
  cnn_veto.hot_pixels=True       mask hot pixels found on each process's first 10 images

Each veto is logged and written to the per-process debug log (debug/debug_<rank>.txt, state
"stop", message cnn_veto_<P(HIT)+P(MAYBE)>); every decision goes to cnn_veto_<rank>.csv in
output.output_dir. The model is loaded once per process.

Examples::

  dials.cnn_stills_process run20.h5 cnn_veto.model=LO19.pt params.phil

  mpirun -n 16 dials.cnn_stills_process run20.h5 mp.method=mpi cnn_veto.model=LO19.pt params.phil
"""


def check_model(args):
    """Fail once, clearly, before any processing, if the veto's model cannot be used."""
    parser = ArgumentParser(usage=VetoScript.usage, phil=veto_phil_scope(), epilog=help_message)
    params, _ = parser.parse_args(args=args, quick_parse=True)
    if not params.cnn_veto.enable:
        return
    path = shipped_model_path(params.cnn_veto.model)
    try:
        load_model(path)
    except ModelError as error:
        if params.cnn_veto.model is None:
            raise dials.util.Sorry(
                f"No default model is installed ({path} is missing); pass cnn_veto.model=<file written by "
                "dials.cnn_train> or cnn_veto.enable=False"
            ) from None
        raise dials.util.Sorry(str(error)) from None


@dials.util.show_mail_handle_errors()
def run(args=None):
    import sys

    if args is None:
        args = sys.argv[1:]
    check_model(args)
    VetoScript(help_message).run(args)


if __name__ == "__main__":
    run()
