"""Small simulated runs and tiny model files shared by the baseline, report, evaluate and pre-filter tests."""

import torch

from dials_cnn import layouts, presets, simulate
from dials_cnn.annotations import write_annotations
from dials_cnn.model import build_network, save_model
from dials_cnn.preprocess import PreprocessParams

SIDE = 256  # simulated stills cut to SIDE x SIDE around the beam: small files, fast spot finding
TINY_PREPROCESS = PreprocessParams(pipeline="native", crop=64, bin=2)
# LO19's preset with the global threshold back at DIALS' default, so the cut images have some spots
SPOTFINDER = ["spotfinder.threshold.dispersion.global_threshold=0"]


def write_small_run(directory, preset_name="LO19", n_images=10, seed=1, name="run.h5"):
    """Simulated stills of a preset, cut around the beam, in one idh5 file with expert_annotation.txt.

    Returns (path of the h5 file, path of the annotation file, expert labels)."""
    preset = presets.get_preset(preset_name)
    pixel_mm = simulate.detector_frame(preset.family).pixel_size_mm
    labels = []
    path = directory / name
    with layouts.Idh5Writer(
        path, image_shape=(SIDE, SIDE), pixel_size_mm=pixel_mm, beam_center_mm=(SIDE / 2 * pixel_mm,) * 2,
        min_trusted_value=preset.min_trusted_value, saturated_value=preset.saturated_value, chunk_size=4,
    ) as writer:
        for index in range(n_images):
            still = simulate.simulate_image(preset, seed, index)
            cx, cy = (int(round(v)) for v in still.beam_centre_px)
            cut = still.image[cy - SIDE // 2 : cy + SIDE // 2, cx - SIDE // 2 : cx + SIDE // 2]
            writer.append(cut, still.distance_mm, still.wavelength_A)
            labels.append(still.truth["label"])
    annotation = directory / "expert_annotation.txt"
    write_annotations(annotation, [(name, index, label) for index, label in enumerate(labels)])
    return path, annotation, labels


def tiny_model(path, seed=0):
    """An untrained small network (what is tested is bookkeeping, not accuracy). Its final layer is
    drawn at random (spotnet starts from zeros, i.e. the same probabilities for every image)."""
    torch.manual_seed(seed)
    network = build_network("spotnet", widths=(4, 8, 8, 8))
    torch.nn.init.normal_(network.classifier.weight, std=1.0)
    save_model(path, network, "spotnet", TINY_PREPROCESS, architecture_kwargs={"widths": [4, 8, 8, 8]})
    return path
