"""Text encoders: captions -> token embeddings + key padding mask, the DiT's cross-attention context.

Both follow one contract:

    emb, mask = encoder(captions: list[str])     emb [B, L, dim] (zero at padding), mask [B, L] bool (True = token)

and expose `encoder.dim` (wire it to `DiT(text_dim=...)`) and `encoder.trainable`.

- `ByteTextEncoder`: UTF-8 bytes + BOS/EOS/PAD ids through a small pre-LN transformer; needs no tokenizer file,
  trained jointly with the DiT (the embedded default).
- `HFTextEncoder`: a frozen Hugging Face encoder (T5 / mT5 / UMT5 encoder, CLIP text, or any `AutoModel`
  encoder) + its tokenizer loaded from a local folder only (`local_files_only=True`: nothing is downloaded).
  Its `config` records the folder, so checkpoints need not carry its weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from vidgen.models.layers import Attention, FeedForward
from vidgen.models.base import Configurable, capture_config

_PADDINGS = ("longest", "max_length")


def _check_padding(padding: str) -> None:
    if padding not in _PADDINGS:
        raise ValueError(f"padding={padding!r}; expected one of {_PADDINGS}")


class EncoderBlock(nn.Module):
    """Pre-LN transformer encoder block `[B, L, D] -> [B, L, D]` with a key padding mask `[B, L]`."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qk_norm=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.ffn(self.norm2(x))


class ByteTextEncoder(nn.Module, Configurable):
    """Byte-level caption encoder: `forward(captions) -> (emb [B, L, dim], mask [B, L])`, L <= max_length.

    Ids 0..255 are UTF-8 bytes, then PAD, BOS, EOS; a caption longer than `max_length - 2` bytes is truncated.
    padding: "longest" (pad to the batch's longest caption) or "max_length" (always `max_length`, fixed-shape
    embeddings, e.g. for latent shards).
    """

    PAD, BOS, EOS = 256, 257, 258
    VOCAB = 259

    def __init__(self, dim: int = 256, depth: int = 4, num_heads: int = 4, max_length: int = 128,
                 ffn_mult: int = 4, padding: str = "longest"):
        super().__init__()
        self.config = capture_config(ByteTextEncoder, locals())
        _check_padding(padding)
        if max_length < 3:
            raise ValueError(f"max_length must leave room for BOS, EOS and a byte, got {max_length}")
        self.dim, self.max_length, self.padding = dim, max_length, padding
        self.trainable = True
        self.token_embedding = nn.Embedding(self.VOCAB, dim)
        self.pos_embedding = nn.Parameter(torch.randn(max_length, dim) * 0.02)  # learned absolute positions
        self.blocks = nn.ModuleList([EncoderBlock(dim, num_heads, ffn_mult * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> ids `[B, L]` long, mask `[B, L]` bool, on the module's device."""
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        seqs = [[self.BOS, *c.encode("utf-8")[: self.max_length - 2], self.EOS] for c in captions]
        length = self.max_length if self.padding == "max_length" else max((len(s) for s in seqs), default=2)
        ids = torch.full((len(seqs), length), self.PAD, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        device = self.token_embedding.weight.device
        return ids.to(device), (ids != self.PAD).to(device)

    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions)
        x = self.token_embedding(ids) + self.pos_embedding[: ids.shape[1]]  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x) * mask[..., None]  # zeros at padding, as Wan feeds padded text
        return x, mask


class HFTextEncoder(nn.Module, Configurable):
    """Frozen Hugging Face text encoder from a local folder: `forward(captions) -> (emb [B, L, dim], mask [B, L])`.

    path: folder holding the model (`config.json` + weights) and its tokenizer files. max_length / padding as
    `ByteTextEncoder` (Wan 2.1 uses UMT5-XXL, max_length 512, padding "max_length"). dtype: weights dtype name
    ("float32", "bfloat16", ...). dim: expected hidden size, checked after loading (None: not checked); the
    loaded model's width is `self.dim`.
    """

    loads_own_weights = True  # an export records the folder path; the weights stay in that folder

    _ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel",
                 "clip": "CLIPTextModel", "clip_text_model": "CLIPTextModel"}

    def __init__(self, path: str, max_length: int = 512, padding: str = "longest", dtype: str = "float32",
                 dim: int | None = None):
        super().__init__()
        self.config = capture_config(HFTextEncoder, locals())
        _check_padding(padding)
        import transformers  # heavy and optional: only this encoder needs it

        if not os.path.isdir(path):
            raise FileNotFoundError(f"HFTextEncoder path={path!r}: not a folder (a local model + tokenizer)")
        hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = getattr(transformers, self._ENCODERS.get(hf_config.model_type, "AutoModel"))
        self.model = cls.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model.requires_grad_(False).eval()
        self.dim = int(self.model.config.hidden_size)
        if dim is not None and dim != self.dim:
            raise ValueError(f"HFTextEncoder {path}: hidden size is {self.dim}, config says dim={dim}")
        self.max_length, self.padding = max_length, padding
        self.trainable = False
        self.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        """Stay in eval mode: the encoder is frozen (no dropout) whatever the parent module does."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(captions, str):
            raise TypeError("captions must be a list of strings, not one string")
        tok = self.tokenizer(list(captions), padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device).bool()
        emb = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return emb * mask[..., None], mask
