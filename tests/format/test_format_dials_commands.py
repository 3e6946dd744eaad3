"""The stock dials.import / dials.find_spots, run as subprocesses, on files from each writer."""

import subprocess

import numpy as np
import pytest
from dials.array_family import flex

from dials_cnn import cspad
from conftest import CSPAD_SPOTS, RAYONIX_SPOTS

LAYOUTS = {
    "cspad_idh5": "FormatHDF5CXIDB76",
    "raw_cspad": "FormatHDF5RawCspad",
    "rayonix": "FormatHDF5BinnedRayonix",
}


def run(command, cwd):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output, output
    return output


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def spotfinding(request, tmp_path_factory):
    written = request.getfixturevalue(request.param)
    workdir = tmp_path_factory.mktemp("dials_" + request.param)
    imported = run(["/usr/bin/dials.import", written.path, "output.experiments=imported.expt"], workdir)
    run(["/usr/bin/dials.find_spots", "imported.expt", "output.reflections=strong.refl", "nproc=1"], workdir)
    reflections = flex.reflection_table.from_file(str(workdir / "strong.refl"))
    return request.param, imported, reflections


def test_dials_import_names_our_format(spotfinding):
    layout, imported, _ = spotfinding
    assert f"dials_cnn.format.{LAYOUTS[layout]}.{LAYOUTS[layout]}" in imported


def test_find_spots_finds_painted_spots_and_nothing_else(spotfinding):
    layout, _, reflections = spotfinding
    ids = reflections["id"].as_numpy_array()
    assert np.count_nonzero(ids == 0) == 6  # six spots painted on the first shot
    assert np.count_nonzero(ids == 1) == 0  # flat Poisson background only on the second
    x, y, _ = reflections["xyzobs.px.value"].parts()
    found = sorted(zip(reflections["panel"].as_numpy_array().tolist(), np.floor(y).astype(int), np.floor(x).astype(int)))
    if layout == "raw_cspad":  # per-ASIC panels: (panel, slow, fast) of each painted spot
        assert found == sorted(CSPAD_SPOTS)
    elif layout == "rayonix":
        assert found == sorted((0, row, col) for row, col in RAYONIX_SPOTS)
    else:  # the same ASIC spots, where the assembled 1765 x 1765 frame puts them
        expected = []
        for asic, slow, fast in CSPAD_SPOTS:
            stack = np.zeros((64, 185, 194), dtype=np.int8)
            stack[asic, slow, fast] = 1
            (row, col), = np.argwhere(cspad.assemble(stack))
            expected.append((0, row, col))
        assert found == sorted(expected)
