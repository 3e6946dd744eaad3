"""The compiled helpers are used only when they implement the interface the Python code expects."""

import shutil
import subprocess

import pytest

from dials_cnn import native


@pytest.fixture
def library_at(monkeypatch):
    """Point dials_cnn.native at another shared library for one test."""

    def point(path):
        monkeypatch.setattr(native, "LIBRARY", str(path))
        native._library.cache_clear()
        native.function.cache_clear()

    yield point
    native._library.cache_clear()
    native.function.cache_clear()


def compile_library(tmp_path, name, source):
    """A shared library of its own name: the dynamic loader keeps the first library loaded from a path."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is missing: make env installs it (it builds dials_cnn/_native.c)")
    c_file, library = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    c_file.write_text(source)
    subprocess.run(["gcc", "-fPIC", "-shared", "-o", str(library), str(c_file)], check=True)
    return library


def test_a_library_of_another_version_is_not_used(tmp_path, library_at):
    """A _native.so built from an older _native.c (same symbol, fewer arguments) would read garbage;
    the version stamp makes the callers fall back to numpy and torch instead."""
    library_at(compile_library(tmp_path, "older", "const int dials_cnn_native_version = 1;\n"
                                         "int block_lcn_max(void) { return 0; }\n"))
    assert native.function("block_lcn_max") is None
    library_at(compile_library(tmp_path, "unstamped", "int block_lcn_max(void) { return 0; }\n"))  # no stamp at all
    assert native.function("block_lcn_max") is None
    library_at(compile_library(tmp_path, "current", f"const int dials_cnn_native_version = {native.VERSION};\n"
                                                    "int block_lcn_max(void) { return 0; }\n"))
    assert native.function("block_lcn_max") is not None  # the stamp alone decides
    library_at(tmp_path / "absent.so")
    assert native.function("block_lcn_max") is None
