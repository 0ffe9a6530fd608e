"""The `text` entry: captions (or precomputed embeddings) -> {"context" [B, L, D], "context_mask" [B, L]}.

Classifier-free guidance (Ho & Salimans 2022) trains the unconditional branch by replacing a sample's text with
the null caption ("") with probability `dropout`. With a trainable encoder the caption itself is replaced; with
precomputed embeddings (latent shards) the null embedding comes from the shards (`text_null_emb` /
`text_null_mask` in the batch), written by the same encoder that wrote the captions' embeddings, so no text
encoder is needed at all to train on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vidgen.diffusion.flow import pad_tokens
from vidgen.errors import UserError


def drop_captions(captions: Sequence[str], p: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by "" with probability `p`."""
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist())]


def drop_embeddings(context: torch.Tensor, mask: torch.Tensor | None, null_context: torch.Tensor,
                    null_mask: torch.Tensor | None, p: float, generator: torch.Generator | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace samples' text by the null embedding with probability `p`.

    context `[B, L, D]`, mask `[B, L]` (None = all valid); null_context `[L0, D]` / `[1, L0, D]`, null_mask
    `[L0]` / `[1, L0]`. Returns (context, mask) padded to max(L, L0) with zeros / False.
    """
    b = context.shape[0]
    null_context = null_context.reshape(1, *null_context.shape[-2:]).to(context)
    if mask is None:
        mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    if null_mask is None:
        null_mask = torch.ones(null_context.shape[:2], dtype=torch.bool, device=context.device)
    null_mask = null_mask.reshape(1, -1).bool().to(context.device)
    length = max(context.shape[1], null_context.shape[1])
    context, mask = pad_tokens(context, mask.bool(), length)
    null_context, null_mask = pad_tokens(null_context, null_mask, length)
    drop = (torch.rand(b, generator=generator) < p).to(context.device)
    context = torch.where(drop[:, None, None], null_context, context)
    mask = torch.where(drop[:, None], null_mask, mask)
    return context, mask


class TextCondition(nn.Module):
    """Text entry: `forward(batch, drop, generator) -> {"context", "context_mask"}`.

    encoder: a text encoder (`emb, mask = encoder(captions)`, `.dim`, `.trainable`), or a zero-argument factory
    of a frozen one (Hydra `_partial_: true`) built on first use, so that training on precomputed embeddings
    never loads it. A trainable encoder is a registered submodule (trained, checkpointed); a frozen one is held
    aside (not in state_dict, optimizer or EMA). dropout: CFG dropout probability.
    Batch keys read: "caption" (list[str]) or precomputed "text_emb" [B, L, D] / "text_mask" [B, L] with the
    shards' null "text_null_emb" [L0, D] / "text_null_mask" [L0].
    """

    def __init__(self, encoder: nn.Module | Callable[[], nn.Module], dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"conditioner.text.dropout={dropout}: expected a probability in [0, 1)")
        self.dropout = float(dropout)
        self._frozen: dict[str, Any] = {}
        if isinstance(encoder, nn.Module) and getattr(encoder, "trainable", True):
            self.encoder = encoder
        else:
            self.encoder = None
            self._frozen["encoder"] = encoder  # a module, or a factory called on first use
        self.trainable = self.encoder is not None
        self.register_buffer("_probe", torch.empty(0), persistent=False)

    # ------------------------------------------------------------------ the encoder
    def encoder_module(self) -> nn.Module:
        """The text encoder (built now if it was given as a factory), on this entry's device."""
        if self.encoder is not None:
            return self.encoder
        enc = self._frozen["encoder"]
        if not isinstance(enc, nn.Module):
            enc = self._frozen["encoder"] = enc()
        enc.requires_grad_(False).eval()
        device = self._device()
        if next(enc.parameters()).device != device:
            enc.to(device)
        return enc

    def built_encoder(self) -> nn.Module | None:
        """The encoder if it is built (a trainable one always is; a frozen factory only after first use)."""
        enc = self.encoder if self.encoder is not None else self._frozen["encoder"]
        return enc if isinstance(enc, nn.Module) else None

    def _device(self) -> torch.device:
        return self._probe.device  # follows .to(device) of the parent module; a frozen encoder goes there too

    def spec(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this entry around its encoder part."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "dropout": self.dropout}

    def encoder_spec(self) -> dict[str, Any]:
        """{"class", "config"} of the encoder without building it (a factory's function and keywords)."""
        enc = self.encoder if self.encoder is not None else self._frozen["encoder"]
        if isinstance(enc, nn.Module):
            return {"class": f"{type(enc).__module__}.{type(enc).__qualname__}", "config": enc.config}
        return {"class": f"{enc.func.__module__}.{enc.func.__qualname__}", "config": dict(enc.keywords)}

    @property
    def dim(self) -> int:
        """Width of the embeddings (the DiT's `text_dim`)."""
        enc = self.encoder if self.encoder is not None else self._frozen["encoder"]
        if not isinstance(enc, nn.Module) and enc.keywords.get("dim") is not None:
            return int(enc.keywords["dim"])  # known without loading the encoder
        return int(self.encoder_module().dim)

    # ------------------------------------------------------------------ batch -> keywords
    def encode(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Captions -> {"context" [B, L, D], "context_mask" [B, L]}; gradients only into a trainable encoder."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            context, mask = self.encoder_module()(list(captions))
        return {"context": context, "context_mask": mask}

    def forward(self, batch: dict[str, Any], drop: bool = False,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        p = self.dropout if drop else 0.0
        if "text_emb" not in batch:
            captions = list(batch["caption"])
            return self.encode(drop_captions(captions, p, generator) if p > 0 else captions)
        if self.trainable:
            raise UserError("the batch holds precomputed text embeddings, but the text encoder is trainable "
                            "(model/text=byte): it would never see a caption, and samples would use it; train with "
                            "the encoder that made them (frozen) or set data.use_text_emb=false")
        context, mask = batch["text_emb"], batch.get("text_mask")
        if p > 0:
            if batch.get("text_null_emb") is None:
                raise ValueError("precomputed text embeddings without the shards' null embedding (text_null_emb): "
                                 "re-encode the latent shards with data_prep/encode_latents.py, or set "
                                 "task.module.conditioner.text.dropout=0")
            null = batch["text_null_emb"]
            null_mask = batch.get("text_null_mask")
            # a collated batch repeats the one null per sample: take the first
            null = null[0] if null.ndim == 3 else null
            null_mask = null_mask[0] if null_mask is not None and null_mask.ndim == 2 else null_mask
            context, mask = drop_embeddings(context, mask, null, null_mask, p, generator)
        return {"context": context, "context_mask": mask}
