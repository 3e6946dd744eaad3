"""dials_cnn: CNN screening of serial-crystallography stills, as a DIALS/dxtbx plugin.

The repository root follows the DIALS module layout (``format/``, ``command_line/`` beside the
library), which is mapped here onto one importable package, ``dials_cnn``.
"""

from setuptools import setup

COMMANDS = {
    "dials.cnn_simulate": "simulate",
    "dials.cnn_train": "train",
    "dials.cnn_classify": "classify",
    "dials.cnn_annotate": "annotate",
    "dials.cnn_evaluate": "evaluate",
    "dials.cnn_stills_process": "stills_process",
}

FORMATS = [
    "FormatHDF5CXIDB76:FormatHDF5,FormatStill = dials_cnn.format.FormatHDF5CXIDB76:FormatHDF5CXIDB76",
    "FormatHDF5RawCspad:FormatHDF5,FormatStill = dials_cnn.format.FormatHDF5RawCspad:FormatHDF5RawCspad",
    "FormatHDF5BinnedRayonix:FormatHDF5,FormatStill = dials_cnn.format.FormatHDF5BinnedRayonix:FormatHDF5BinnedRayonix",
]

setup(
    name="dials_cnn",
    version="0.1.0",
    description="Convolutional-neural-network hit finding for XFEL stills (Ke et al. 2018), for DIALS",
    license="BSD-3-Clause",
    python_requires=">=3.9",
    packages=[
        "dials_cnn",
        "dials_cnn.format",
        "dials_cnn.command_line",
    ],
    package_dir={
        "dials_cnn": "dials_cnn",
        "dials_cnn.format": "format",
        "dials_cnn.command_line": "command_line",
    },
    package_data={"dials_cnn": ["data/*.pt", "data/*.json"]},
    # No install_requires: the DIALS environment provides numpy and h5py (Debian's h5py is registered
    # as h5py._debian_h5py_serial, which pkg_resources would refuse), and tools/ensure_env.sh installs
    # torch. dxtbx loads a Format entry point with require=True several times per still, and resolving
    # torch's dependency tree each time cost ~0.7 ms a load: ~3 s to open a 500-still experiment list.
    entry_points={
        "console_scripts": [
            f"{name} = dials_cnn.command_line.{module}:run" for name, module in COMMANDS.items()
        ],
        "dxtbx.format": FORMATS,
    },
)
