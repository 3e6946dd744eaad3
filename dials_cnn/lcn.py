"""Local contrast normalisation (LCN) as in Ke et al. 2018 (REFERENCE §5).

1. global z-score of the image: x <- (x - mean) / std;
2. with a uniform ``window`` x ``window`` neighbourhood (reflect padding, output keeps its size):
   x <- (x - local mean) / max(local std, std_floor).

The local sums are separable box filters done as sums of shifted views of the reflect-padded image
(on CPU several times faster than ``avg_pool2d`` or a convolution, and exact summation unlike
cumulative sums). Local variance is E[x^2] - E[x]^2 of the z-scored image; in float32 its relative
error stays ~1e-6 even next to saturated pixels, because a window holding a bright pixel also has a
large variance (tests/test_lcn.py checks 1e-5 against a float64 loop reference).
"""

import numpy as np
import torch
import torch.nn.functional as F


def local_contrast_normalise(image, window=5, std_floor=1.0, dtype=torch.float32):
    """LCN of one 2-D image or a batch (N, H, W); numpy in, float32 numpy out.

    An image that is constant everywhere has no contrast: its z-score is taken as 0.
    """
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"LCN expects a 2-D image or a (N, H, W) batch, got shape {array.shape}")
    result = lcn_torch(torch.from_numpy(np.ascontiguousarray(array)).to(dtype), window, std_floor)
    return result.to(torch.float32).numpy()


def lcn_torch(images, window=5, std_floor=1.0):
    """LCN of a torch tensor (H, W) or (N, H, W), computed in the tensor's dtype."""
    x = images if images.dim() == 3 else images.unsqueeze(0)
    n = x.shape[0]
    flat = x.reshape(n, -1)
    mean = flat.mean(dim=1).view(n, 1, 1)
    std = flat.std(dim=1, unbiased=False).view(n, 1, 1)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = (x - mean) / std
    half = window // 2
    padded = F.pad(z.unsqueeze(1), (half, half, half, half), mode="reflect").squeeze(1)
    local_mean = box_mean(padded, window)
    local_square = box_mean(padded * padded, window)
    local_var = (local_square - local_mean * local_mean).clamp_min_(0)
    out = (z - local_mean) / local_var.sqrt_().clamp_min_(std_floor)
    return out if images.dim() == 3 else out[0]


def box_mean(padded, window):
    """Mean over every ``window`` x ``window`` square of (N, H, W): output (N, H-window+1, W-window+1)."""
    rows = padded.shape[1] - window + 1
    cols = padded.shape[2] - window + 1
    acc = padded[:, 0:rows, :].clone()
    for k in range(1, window):
        acc += padded[:, k : k + rows, :]
    out = acc[:, :, 0:cols].clone()
    for k in range(1, window):
        out += acc[:, :, k : k + cols]
    return out.mul_(1.0 / (window * window))
