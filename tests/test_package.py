"""The package as DIALS sees it: entry points registered, commands on PATH, library import is quiet."""

import importlib.metadata
import shutil
import subprocess
import sys

import pytest

COMMANDS = {
    "dials.cnn_simulate": "simulate",
    "dials.cnn_train": "train",
    "dials.cnn_classify": "classify",
    "dials.cnn_annotate": "annotate",
    "dials.cnn_evaluate": "evaluate",
    "dials.cnn_stills_process": "stills_process",
}
FORMAT_CLASSES = ["FormatHDF5CXIDB76", "FormatHDF5RawCspad", "FormatHDF5BinnedRayonix"]


def test_dxtbx_registry_knows_our_formats():
    from dxtbx.format.Registry import get_format_class_for

    for name in FORMAT_CLASSES:
        format_class = get_format_class_for(name)
        assert format_class.__name__ == name
        assert format_class.__module__ == f"dials_cnn.format.{name}"


def test_entry_points_are_installed():
    points = importlib.metadata.entry_points()
    formats = {e.value.split(":")[-1] for e in points.select(group="dxtbx.format")}
    assert set(FORMAT_CLASSES) <= formats
    scripts = {e.name: e.value for e in points.select(group="console_scripts")}
    for command, module in COMMANDS.items():
        assert scripts[command] == f"dials_cnn.command_line.{module}:run"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_shows_its_phil_parameters(command):
    path = shutil.which(command)
    assert path, f"{command} is not on PATH"
    result = subprocess.run([path, "-c"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "=" in result.stdout  # a phil listing such as "key = value"


def test_importing_the_library_is_quiet():
    code = "import dials_cnn, dials_cnn.annotations, dials_cnn.fileio; import sys; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.strip() == "False"
