"""Reconstruction metrics: PSNR, SSIM and LPIPS for images [B, 3, H, W] or videos [B, 3, T, H, W] in [-1, 1].

LPIPS (Zhang et al. 2018) is implemented here (VGG16 backbone + the released linear heads) so it
needs neither the `lpips` package nor torchvision; its weights come from a local path only
(see `load_lpips`), since nothing is downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [(B T), C, H, W]; images pass through."""
    return rearrange(x, "b c t h w -> (b t) c h w") if x.ndim == 5 else x


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample, [B]; x, y [B, ...] in [-1, 1] (range 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # [size, size]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per sample, [B] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5,
    K1 = 0.01, K2 = 0.03, valid windows only). Videos are scored frame by frame and averaged;
    channels are averaged. Frames smaller than the window use a window of the frame's size.
    """
    b = x.shape[0]
    xf, yf = _frames(x).float(), _frames(y).float()
    c = xf.shape[1]
    size = min(window, xf.shape[-2], xf.shape[-1])
    size -= 1 - size % 2  # odd
    w = _gaussian_window(size, sigma, xf.device).expand(c, 1, size, size)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, w, groups=c)  # per-channel local mean

    mu_x, mu_y = blur(xf), blur(yf)
    var_x = blur(xf * xf) - mu_x.pow(2)
    var_y = blur(yf * yf) - mu_y.pow(2)
    cov = blur(xf * yf) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.pow(2) + mu_y.pow(2) + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(dim=1).view(b, -1).mean(dim=1)  # per frame, then per sample


# --------------------------------------------------------------------------- LPIPS
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # torchvision vgg16.features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_SLICE_START = (0, 4, 9, 16, 23)  # lpips' `net.sliceK.i` == torchvision `features.(start + i)`
_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS distance (VGG variant, v0.1): x, y [N, 3, H, W] or [B, 3, T, H, W] in [-1, 1] -> [N] / [B].

    Unit-normalised VGG16 activations at five depths, squared differences weighted per channel by
    the learned linear heads, averaged over space and summed over depths (Zhang et al. 2018, Eq. 1).
    Video distances are the mean over frames. All parameters are frozen.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers)  # same indices as torchvision's vgg16().features[:30]
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS])
        # lpips' ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, video = x.shape[0], x.ndim == 5
        fx, fy = self._features(_frames(x)), self._features(_frames(y))
        d = 0.0
        for lin, a, c in zip(self.lins, fx, fy):
            diff = (_unit(a) - _unit(c)).pow(2)
            d = d + lin(diff).mean(dim=(2, 3))  # [N, 1]
        d = d.flatten()  # type: ignore[union-attr]
        return d.view(b, -1).mean(dim=1) if video else d

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, taps = (x.float() - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                taps.append(h)
        return taps


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _load_any(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision / lpips-package / our own keys to this module's names."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("features.") or k.startswith("lins."):
            out[k] = v
        elif k.startswith("net.slice"):  # lpips package: net.slice{1..5}.{i}.weight
            s, i, name = k[len("net.slice"):].split(".")
            out[f"features.{_SLICE_START[int(s) - 1] + int(i)}.{name}"] = v
        elif k.startswith("lin") and ".model.1." in k:  # lpips package: lin{0..4}.model.1.weight
            out[f"lins.{int(k[3])}.weight"] = v
    return out


def load_lpips(path: str | Path) -> LPIPS:
    """LPIPS from local weights: a file holding backbone + heads (our `save`, or an lpips-package
    full state dict), or a folder with the lpips heads (`vgg.pth` from the lpips package) and the
    torchvision VGG16 backbone (`vgg16*.pth`). Loads with `weights_only=True` / safetensors.
    """
    path = Path(path)
    files = sorted(path.glob("*.pth")) + sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"lpips_weights={path}: no weight file(s) found")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_to_ours(_load_any(f)))
    model = LPIPS()
    want = set(model.state_dict())
    missing = sorted(want - set(sd))
    if missing:
        raise KeyError(f"lpips_weights={path}: missing {len(missing)} tensors (e.g. {missing[:3]}); expected "
                       "torchvision vgg16 `features.*` + lpips heads `lin{0..4}.model.1.weight`")
    model.load_state_dict({k: sd[k] for k in want}, strict=True)
    return model
