"""What every vidgen model records about itself: its constructor arguments (`self.config`).

File formats live in `vidgen.io.pretrained` (`save_pretrained(model, dir)` / `load_pretrained(dir)`); a model
only says what it is made of, so that the folder rebuilds it: `type(model)(**model.config)`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

import torch


def capture_config(cls: type, frame_locals: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of `cls` taken from `locals()` inside its `__init__`."""
    params = inspect.signature(cls.__init__).parameters
    return {k: frame_locals[k] for k in params if k != "self" and k in frame_locals}


class Configurable:
    """Mixin of models that set `self.config` (their constructor arguments) in `__init__`.

    `export_extra()` adds keys to an export's config.json (e.g. the VAE's latent statistics); `after_load(meta)`
    restores them when the folder is read back.
    """

    config: dict[str, Any]

    def export_extra(self) -> dict[str, Any]:
        """Extra config.json keys of an export of this model."""
        return {}

    def after_load(self, meta: dict[str, Any]) -> None:
        """Restore extra keys of `config.json` (the inverse of `export_extra`)."""


class LatentStatistics(Configurable):
    """Mixin of the VAEs (video and audio): measured per-channel latent mean/std in the buffers `latent_mean` /
    `latent_std` `[Cz]` (0 / 1 until set), kept in the weights and in an export's config.json.

    The class sets `latent_channels` and registers both buffers; `latent_stats_hint` says how to measure them.
    """

    latent_channels: int
    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    latent_stats_hint = "measure them and store them in the export"

    @property
    def has_latent_stats(self) -> bool:
        """Whether measured latent statistics were set (else normalisation is the identity)."""
        return bool((self.latent_mean != 0).any() or (self.latent_std != 1).any())

    def set_latent_stats(self, mean: torch.Tensor | Sequence[float], std: torch.Tensor | Sequence[float]) -> None:
        """Store per-channel latent mean/std `[Cz]`."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        c = self.latent_channels
        if mean.numel() != c or std.numel() != c:
            raise ValueError(f"latent stats need {c} values each, got mean {mean.numel()} / std {std.numel()}")
        if not bool((std > 0).all()) or not bool(torch.isfinite(mean).all()):
            raise ValueError("latent std must be positive and latent mean finite")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) shaped to broadcast over latents `like` `[B, Cz, ...]`, in its dtype and device."""
        if not self.has_latent_stats:
            warnings.warn(f"{type(self).__name__} latent normalisation requested but no latent statistics were "
                          f"measured; using mean 0 / std 1 ({self.latent_stats_hint})", stacklevel=3)
        view = (1, -1) + (1,) * (like.ndim - 2)
        return self.latent_mean.view(view).to(like), self.latent_std.view(view).to(like)

    def export_extra(self) -> dict[str, Any]:
        """config.json keys of an export: the latent statistics (also in the weights, readable without them)."""
        return {"latent_mean": self.latent_mean.tolist(), "latent_std": self.latent_std.tolist(),
                "latent_stats_measured": self.has_latent_stats}

    def after_load(self, meta: dict[str, Any]) -> None:
        """Restore latent statistics from config.json (they are also in the weights file)."""
        if "latent_mean" in meta and "latent_std" in meta:
            self.set_latent_stats(meta["latent_mean"], meta["latent_std"])
