"""Causal 3D convolution and the one cache object that streams it across temporal chunks.

A causal conv pads time on the past side only, so output frame `i` sees input frames `<= i`
(MAGVIT-v2, Yu et al. 2023, Sec. 3.1; the Wan 2.1 VAE). Because of that, a video can be
processed chunk by chunk: each causal layer keeps the last `k_t - 1` frames of its input in a
`CausalCache` and prepends them to the next chunk, which gives exactly the whole-video result
with memory bounded by the chunk size.

Unlike Wan 2.1's `feat_cache` list + `feat_idx=[0]` counter threaded through every block, the
state lives in one explicit object keyed by layer, so a block can never read another's slot.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CausalCache:
    """Per-layer streaming state for chunked (temporal) encoding or decoding.

    Create one per stream (one per video and per spatial tile), pass it to every chunk of that
    stream in order, and drop it afterwards. Layers store tensors (their last input frames) or
    small flags (e.g. "the first frame has been seen") under their own module as key.
    """

    def __init__(self) -> None:
        self._state: dict[nn.Module, Any] = {}

    def get(self, layer: nn.Module, default: Any = None) -> Any:
        """The state `layer` stored after the previous chunk (or `default` on the first chunk)."""
        return self._state.get(layer, default)

    def put(self, layer: nn.Module, value: Any) -> None:
        """Store `layer`'s state for the next chunk."""
        self._state[layer] = value

    def __len__(self) -> int:
        return len(self._state)

    def nbytes(self) -> int:
        """Bytes held by cached tensors (the memory that chunked processing carries over)."""
        return sum(v.numel() * v.element_size() for v in self._state.values() if isinstance(v, torch.Tensor))


_MKLDNN = torch.backends.mkldnn.is_available()


class CausalConv3d(nn.Conv3d):
    """3D convolution, zero-padded `k_t - 1` frames in the past only and symmetric in space.

    x [B, C_in, T, H, W] -> [B, C_out, T, H', W'] (T is preserved for temporal stride 1).
    With a `cache`, the padding frames are the previous chunk's last input frames instead of
    zeros, so `conv(cat(a, b)) == cat(conv(a, cache), conv(b, cache))` exactly.
    Layer names and weight shapes match diffusers' `WanCausalConv3d` (`padding=1` -> causal time
    pad 2 + spatial pad 1), so published Wan weights load without renaming.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        p = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        s = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        # Space is padded inside the conv; time is padded by hand (past side only) in forward.
        super().__init__(in_channels, out_channels, k, stride=s, padding=(0, p[1], p[2]))
        self.time_pad = 2 * p[0]

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C_out, T, H, W]; `cache` carries the last `time_pad` frames."""
        if self.time_pad == 0:
            return super().forward(x)
        past = cache.get(self) if cache is not None else None
        if past is None:
            x = F.pad(x, (0, 0, 0, 0, self.time_pad, 0))  # zeros before frame 0 (the causal "past")
        else:
            x = torch.cat([past.to(x.dtype), x], dim=2)
        if cache is not None:
            # Clone: a slice is a view that would keep this chunk's whole input alive until the next chunk.
            # Taking it from the padded input keeps chunks shorter than time_pad exact.
            cache.put(self, x[:, :, -self.time_pad:].clone())
        return super().forward(x)

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # On CPU, PyTorch sends a batch-1 float32 conv3d with a small input to its native `slow_conv3d` (a
        # heuristic in ConvParams::use_mkldnn), 2-4x slower than oneDNN on the same call: 87% of the demo VAE's
        # decode time. Call oneDNN directly there (same result within float rounding, autograd supported).
        if x.device.type == "cpu" and x.dtype == torch.float32 and _MKLDNN:
            return torch.mkldnn_convolution(x.contiguous(), weight, bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super()._conv_forward(x, weight, bias)
