"""VAE training losses: reconstruction (L1 + LPIPS), KL, and a 3D patch discriminator with hinge loss.

The adversarial part follows taming-transformers (Esser et al. 2021, "Taming Transformers",
Eq. 7): the generator's GAN loss is scaled by the ratio of gradient norms of the reconstruction
and GAN losses at the decoder's last layer, so neither term swamps the other; the discriminator
is a PatchGAN (Isola et al. 2017) made 3D so it also judges temporal consistency.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from vidgen.eval.metrics import load_lpips

log = logging.getLogger(__name__)


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: x [B, 3, T, H, W] in [-1, 1] -> real/fake logits [B, 1, T', H/2^n, W/2^n].

    First conv halves space only; the next `num_layers - 1` halve space and time (a 1-frame image
    stays 1 frame: kernel 3, padding 1). GroupNorm instead of BatchNorm: batches are small and
    bucketed by shape, and batch statistics would leak between real and fake halves.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv3d(in_channels, base_channels, (3, 4, 4), (1, 2, 2), 1), nn.LeakyReLU(0.2)]
        c = base_channels
        for i in range(1, num_layers + 1):
            c_out = base_channels * min(2**i, 8)
            stride = (2, 2, 2) if i < num_layers else (1, 1, 1)
            layers += [nn.Conv3d(c, c_out, (3, 4, 4), stride, 1, bias=False),
                       nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv3d(c, 1, (3, 4, 4), 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN init, as in taming's NLayerDiscriminator
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): E[relu(1 - D(x))] + E[relu(1 + D(G(z)))], halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """||grad_last rec_loss|| / (||grad_last g_loss|| + 1e-4), clamped to [0, max_weight], detached (taming Eq. 7)."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class ReconstructionLoss(nn.Module):
    """L1 + lpips_weight * LPIPS between x and its reconstruction, both [B, 3, T, H, W] in [-1, 1].

    LPIPS needs local weights (`lpips_weights`, see `vidgen.eval.metrics.load_lpips`); without
    them the loss logs "LPIPS disabled: no weights given" once and is plain L1. The LPIPS net
    is held outside the module tree so it never enters checkpoints, EMA, or optimizers.
    """

    def __init__(self, l1_weight: float = 1.0, lpips_weight: float = 1.0, lpips_weights: str | None = None) -> None:
        super().__init__()
        self.l1_weight, self.lpips_weight = l1_weight, lpips_weight
        self._lpips: list[nn.Module] = []  # list: not registered as a submodule
        if lpips_weights and lpips_weight > 0:
            self._lpips.append(load_lpips(lpips_weights))
        elif lpips_weight > 0:
            log.warning("LPIPS disabled: no weights given")

    @property
    def lpips(self) -> nn.Module | None:
        """The frozen LPIPS network, or None when disabled."""
        return self._lpips[0] if self._lpips else None

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> {"rec": weighted sum, "l1": mean abs error, "lpips": mean LPIPS (0 when disabled)}."""
        l1 = (recon - x).abs().mean()
        out = {"l1": l1, "lpips": torch.zeros((), device=x.device)}
        if self.lpips is not None:
            net = self.lpips.to(x.device)
            out["lpips"] = net(recon.float(), x.float()).mean()
        out["rec"] = self.l1_weight * l1 + self.lpips_weight * out["lpips"]
        return out
