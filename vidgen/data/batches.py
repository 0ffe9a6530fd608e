"""The two batch kinds the data modules yield: the contract between the data layer and the training modules.

Every batch holds one shape (one bucket). Tensors are CPU tensors until Lightning moves them to the device.
"""

from __future__ import annotations

from typing import TypedDict

import torch


class _Common(TypedDict):
    caption: list[str]   # [B] the clips' captions ("" where none)
    key: list[str]       # [B] sample keys in the shards
    fps: torch.Tensor    # [B] float32: frame rate of the sampled frames (source fps / frame step)


class _ClipRequired(_Common):
    video: torch.Tensor  # [B, 3, T, H, W] float32 in [-1, 1]


class ClipBatch(_ClipRequired, total=False):
    """Clip shards (ClipDataModule): pixels of one bucket, plus the clips' audio with `data.audio=true`.

    audio: the stored waveform over exactly the sampled frames' time span (vidgen.data.audio.audio_span), at
    `data.audio_rate` with `data.audio_channels`; one length S per batch. audio_valid: False where it is zeros
    standing in for missing audio (a clip without audio, an image, padding where the source audio did not reach).
    """

    audio: torch.Tensor        # [B, C, S] float32 in [-1, 1]
    audio_valid: torch.Tensor  # [B] bool


class _LatentRequired(_Common):
    latent: torch.Tensor  # [B, C, t, h, w] float32, normalised by the VAE's latent mean/std


class LatentBatch(_LatentRequired, total=False):
    """Latent shards (LatentDataModule): VAE latents of one shape, plus the stored text embeddings if any.

    text_emb / text_mask: present when the shards hold text embeddings (and `use_text_emb`); zero-padded to the
    batch's longest caption (or `text_pad_to`). text_null_emb / text_null_mask: the "" caption's embedding stored
    with those shards (the null for classifier-free-guidance dropout, from the same text encoder); unbatched.
    """

    text_emb: torch.Tensor        # [B, L, D] float32
    text_mask: torch.Tensor       # [B, L] bool
    text_null_emb: torch.Tensor   # [L0, D] float32
    text_null_mask: torch.Tensor  # [L0] bool
