"""The CNN veto processor on its own: phil, the Processor swap, and one image kept / one vetoed."""

import pytest
from dials.command_line import stills_process
from dxtbx.model.experiment_list import ExperimentListFactory

from dials_cnn import prefilter
from dials_cnn.classify import classify_experiments
from dials_cnn.model import load_model
from simulated_runs import tiny_model, write_small_run


def test_phil_is_stills_process_plus_cnn_veto():
    params = prefilter.veto_phil_scope().extract()
    assert params.cnn_veto.enable is True and params.cnn_veto.threshold == 0.5 and params.cnn_veto.model is None
    # stills_process's own program defaults are kept
    assert params.indexing.method == "fft1d"
    assert params.integration.integrator == "stills"
    assert params.mp.method == "multiprocessing"


def test_processor_is_swapped_only_while_the_script_runs():
    assert stills_process.Processor is not prefilter.VetoProcessor
    with prefilter.processors_with_veto():
        assert stills_process.Processor is prefilter.VetoProcessor
    assert stills_process.Processor is not prefilter.VetoProcessor
    with pytest.raises(RuntimeError):
        with prefilter.processors_with_veto():
            raise RuntimeError("processing failed")
    assert stills_process.Processor is not prefilter.VetoProcessor


def test_vetoed_image_never_reaches_spot_finding(tmp_path):
    h5, _, _ = write_small_run(tmp_path, n_images=4, seed=5)
    model_path = tiny_model(tmp_path / "tiny.pt")
    experiments = ExperimentListFactory.from_filenames([str(h5)])
    records = classify_experiments(experiments, load_model(model_path)).records
    p = sorted(r.probabilities[0] + r.probabilities[1] for r in records)
    threshold = (p[1] + p[2]) / 2  # two kept, two vetoed

    params = prefilter.veto_phil_scope().extract()
    params.cnn_veto.model = str(model_path)
    params.cnn_veto.threshold = threshold
    params.output.output_dir = str(tmp_path)
    params.dispatch.index = False  # spot finding is the stage that matters here
    processor = prefilter.VetoProcessor(params, composite_tag="0000", rank=0)
    for i, experiment in enumerate(experiments):
        processor.process_experiments("image_%d" % i, experiments[i : i + 1])
    processor.finalize()

    debug = (tmp_path / "debug" / "debug_0.txt").read_text().splitlines()
    reached = {line.split(",")[1] for line in debug if line.endswith("spotfind_start")}
    vetoed = {line.split(",")[1] for line in debug if ",cnn_veto_" in line}
    kept = {"image_%d" % i for i, r in enumerate(records) if r.probabilities[0] + r.probabilities[1] > threshold}
    assert reached == kept and len(kept) == 2
    assert vetoed == {"image_%d" % i for i in range(4)} - kept
    summary = processor.summary()
    assert (summary["images"], summary["vetoed"], summary["kept"]) == (4, 2, 2)
    assert (tmp_path / "cnn_veto_0000.csv").read_text().count("\n") == 5
