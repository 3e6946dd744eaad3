"""The compiled per-pixel passes of classification (``_native.c``), loaded with ctypes.

``make env`` (tools/ensure_env.sh) builds ``_native.so`` beside this file with gcc. Where it is not
built, or ``DIALS_CNN_NATIVE=0`` is set, :func:`function` returns None and the callers
(:mod:`dials_cnn.projection`, :mod:`dials_cnn.lcn`) do the same arithmetic with numpy and torch,
about 1.7x more slowly per image.
"""

import ctypes
import functools
import os

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_native.so")

_long, _pointer, _int = ctypes.c_long, ctypes.c_void_p, ctypes.c_int
VERSION = 2  # dials_cnn_native_version of the _native.c these signatures describe
SIGNATURES = {
    "block_lcn_max": (ctypes.c_int, [_pointer, _long, _long, _long, _int, _int, ctypes.c_double, ctypes.c_double,
                                     _pointer]),
    "clean_cut_i32": (None, [_pointer, _long, _long, _long, _pointer, _long, ctypes.c_float, ctypes.c_float,
                             _pointer, _pointer]),
}


@functools.lru_cache(maxsize=None)
def _library():
    if os.environ.get("DIALS_CNN_NATIVE", "1") == "0" or not os.path.exists(LIBRARY):
        return None
    try:
        library = ctypes.CDLL(LIBRARY)
        if ctypes.c_int.in_dll(library, "dials_cnn_native_version").value != VERSION:
            return None
    except (OSError, ValueError):  # not loadable, or built from an older _native.c
        return None
    return library


@functools.lru_cache(maxsize=None)
def function(name):
    """The compiled function ``name`` of :data:`SIGNATURES`, or None."""
    library = _library()
    if library is None:
        return None
    try:
        compiled = getattr(library, name)
    except AttributeError:  # a library built from an older _native.c
        return None
    compiled.restype, compiled.argtypes = SIGNATURES[name]
    return compiled
