"""Fréchet Video Distance (Unterthiner et al. 2018) with a local I3D TorchScript file; statistics in float64.

The network is `i3d_torchscript.pt`, the TorchScript port of the tf.hub Kinetics-400 I3D that StyleGAN-V
(`src/metrics/frechet_video_distance.py`) and the evaluation code derived from it (VideoGPT-style FVD,
common-metrics-on-video-quality, ...) load. Its forward is `forward(x, rescale, resize, return_features)` with
x `[B, 3, T, H, W]`. We do the preprocessing ourselves, as the derived code does, and call it with
`rescale=False, resize=False, return_features=True`:

- input float32 `[B, 3, T, 224, 224]` in [-1, 1] (`rescale=True` would instead map uint8-valued [0, 255] to
  [-1, 1] inside the network: the same numbers);
- every frame resized to 224x224 (bilinear, no crop, aspect not kept), as the original TF implementation
  (`tf.image.resize_bilinear` to 224x224) and StyleGAN-V's in-network `resize=True` do;
- the first `frames` frames (16 in the published protocols; all of them when a video is shorter);
- output: the 400 Kinetics logits before the softmax, one row per video.

FVD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over the feature mean and (unbiased) covariance
of each set. With few videos (fewer than the 400 feature dimensions) the covariances are rank-deficient and
the number is a biased, noisy estimate: compare checkpoints at equal video counts, and report those counts.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from vidgen.errors import UserError

I3D_SIZE = 224
FVD_FRAMES = 16


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] -> (mean [D], unbiased covariance [D, D]), both float64; N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feature_stats needs at least 2 feature rows [N, D], got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via its eigen-decomposition (eigenvalues clamped at 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str = "auto") -> float:
    """tr((S1 S2)^(1/2)) for covariances S1, S2 [D, D] (float64).

    "scipy": `scipy.linalg.sqrtm(S1 @ S2)` as pytorch-fid / StyleGAN-V compute it (a small diagonal offset is added
    when the product is singular enough to give non-finite values). "eigh": the symmetric form
    tr((S1^(1/2) S2 S1^(1/2))^(1/2)), which has the same eigenvalues as S1 S2 and needs only `numpy.linalg.eigh`.
    "auto": scipy when installed, else eigh.
    """
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if method == "auto":
        method = "scipy" if importlib.util.find_spec("scipy") is not None else "eigh"
    if method == "eigh":
        root1 = _sqrtm_psd(s1)
        w = np.linalg.eigvalsh(root1 @ s2 @ root1)
        return float(np.sqrt(np.clip(w, 0, None)).sum())
    if method != "scipy":
        raise ValueError(f"method={method!r}: expected auto, scipy or eigh")
    import scipy.linalg  # optional: the eigh form needs only numpy

    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: offset the diagonals (pytorch-fid's remedy)
        offset = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(np.trace(np.real(covmean)))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "auto") -> float:
    """Fréchet distance between N(mu1, S1) and N(mu2, S2): ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} / {mu2.shape}, "
                         f"sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    d = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2, method)
    return float(max(d, 0.0))  # rounding can leave -1e-12 for identical sets


def fvd_from_features(feats_a: np.ndarray, feats_b: np.ndarray, method: str = "auto") -> float:
    """FVD between two feature sets [N, D] and [M, D] (N, M >= 2)."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b), method=method)


def load_i3d(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """The I3D TorchScript file at `path` (`torch.jit.load(..., map_location="cpu")`), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"i3d={path}: no such file (expected i3d_torchscript.pt, the TorchScript I3D of "
                                "StyleGAN-V's FVD; nothing is downloaded)")
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as e:
        raise UserError(f"i3d={path}: not a TorchScript file ({str(e).splitlines()[0]})") from None


class I3DFeatures:
    """Videos -> I3D features: `x [B, 3, T, H, W]` in [-1, 1] -> float64 `[B, D]` (see the module docstring)."""

    def __init__(self, detector: torch.jit.ScriptModule, device: str | torch.device = "cpu",
                 frames: int | None = FVD_FRAMES, size: int = I3D_SIZE, batch_size: int = 8):
        self.detector = detector.to(device)
        self.device, self.frames, self.size, self.batch_size = torch.device(device), frames, size, batch_size
        names = {a.name for a in detector.forward.schema.arguments} if hasattr(detector.forward, "schema") else set()
        wanted = {"rescale": False, "resize": False, "return_features": True}
        self.kwargs = {k: v for k, v in wanted.items() if k in names}  # a plain forward(x) network gets x only

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> float32 [B, 3, T', 224, 224] in [-1, 1], T' = min(T, frames)."""
        x = x[:, :, : self.frames] if self.frames else x
        x = x.to(self.device, torch.float32).clamp(-1, 1)
        t = x.shape[2]
        # trilinear with T unchanged == bilinear per frame (StyleGAN-V's in-network resize)
        return F.interpolate(x, size=(t, self.size, self.size), mode="trilinear", align_corners=False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            clip = self.preprocess(x[i:i + self.batch_size])
            try:
                feats = self.detector(clip, **self.kwargs)
            except RuntimeError as e:  # e.g. too few frames for the I3D's temporal pooling
                raise UserError(f"i3d: the network failed on input {tuple(clip.shape)} ({str(e).splitlines()[0]}); "
                                f"the published I3D needs clips of about 9 frames or more (FVD protocols use 16)"
                                ) from None
            out.append(feats.double().flatten(1).cpu().numpy())
        return np.concatenate(out)

    def features_of(self, batches: Iterable[dict | torch.Tensor], max_videos: int) -> np.ndarray:
        """Features of up to `max_videos` videos from batches of {"video": [B, 3, T, H, W]} (or such tensors)."""
        out, n = [], 0
        for batch in batches:
            x = batch["video"] if isinstance(batch, dict) else batch
            x = x[: max_videos - n]
            out.append(self(x))
            n += x.shape[0]
            if n >= max_videos:
                break
        return np.concatenate(out) if out else np.zeros((0, 0))
