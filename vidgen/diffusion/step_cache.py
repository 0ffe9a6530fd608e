"""Step cache (TeaCache: Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"):
skip the DiT's blocks on sampling steps whose input barely changed, and reuse the blocks' last residual instead.

    cache = StepCache(dit, threshold=0.1, last_t=sigmas[-2])   # one per sampling run: it holds the last residual
    v = cache(z, t, **cond)                                     # the DiT's own call signature

On every call the signal is the first block's timestep-modulated input adaLN(x) (TeaCache's indicator: it follows
the change of the model output better than the timestep embedding or the noisy input alone). Its relative L1
change since the previous call, |s_i - s_{i-1}|_1 / |s_{i-1}|_1, is summed; while the sum stays below `threshold`
the blocks are skipped and their output is input + the residual (output - input) of the last call that ran them;
when it reaches the threshold the blocks run and the sum restarts. The first call and every call at a noise level
<= `last_t` (the schedule's last step) run the blocks, as TeaCache does for its first and last step. TeaCache
rescales the distance with a polynomial fitted per model; this uses it as measured. With CFG both branches are one
batched call, so they skip together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

# Skips about half of 25 steps of a tiny random DiT for a few % mean latent change (measured: tests/test_solvers.py);
# TeaCache reports 0.1-0.2 on its rescaled distance for a 1.6-2.3x speed-up of large video DiTs.
DEFAULT_THRESHOLD = 0.1


class StepCache:
    """`StepCache(dit, threshold, last_t)(z, t, **cond) -> v`: the DiT's velocity `[B, C, T, H, W]` for z
    `[B, C, T, H, W]`, t `[B]`/`[B, T]`, with its blocks skipped while the input changed by less than `threshold`.

    dit: a `vidgen.models.dit.DiT` (its `block_stack` seam and `blocks[0].modulated_input`); threshold >= 0 (0 never
    skips: bit-equal to the bare DiT); last_t: calls whose highest noise level is <= this always run the blocks.
    """

    def __init__(self, dit: nn.Module, threshold: float = DEFAULT_THRESHOLD, last_t: float = 0.0):
        if not threshold >= 0:
            raise ValueError(f"step_cache={threshold}: expected a threshold >= 0 (0 never skips, e.g. 0.1; null: off)")
        if getattr(dit, "sp", None) is not None:  # each rank would decide on its own tokens, and hang
            raise ValueError("step_cache does not run sequence-parallel: turn it off or sample on one process")
        self.dit, self.threshold, self.last_t = dit, float(threshold), float(last_t)
        self.previous: torch.Tensor | None = None  # signal of the previous call, [B, N, D]
        self.residual: torch.Tensor | None = None  # blocks' output - input at the last call that ran them, [B, N, D]
        self.distance = 0.0  # relative L1 change of the signal summed since then

    def __call__(self, z: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        # The last step of every modality runs the blocks (video-to-audio: the video's t is 0 throughout).
        final = max(torch.as_tensor(t).max().item(), torch.as_tensor(cond.get("t_audio", 0.0)).max().item()) \
            <= self.last_t
        return self.dit(z, t, **cond, block_stack=functools.partial(self.blocks, final=final))

    def blocks(self, x: torch.Tensor, mod: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor],
               final: bool = False) -> torch.Tensor:
        """The DiT's block stack on tokens x `[B, N, D]` (mod `[B, F, 6, D]`): `run(x)`, or x + the cached residual."""
        signal = self.dit.blocks[0].modulated_input(x, mod)  # [B, N, D] float32
        previous, self.previous = self.previous, signal
        if not final and self.residual is not None and self.residual.shape == x.shape:
            self.distance += ((signal - previous).abs().mean() / previous.abs().mean()).item()
            if self.distance < self.threshold:
                return x + self.residual
        self.distance = 0.0
        out = run(x)
        self.residual = out - x
        return out
