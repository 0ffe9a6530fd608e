"""Per-step random generators: training randomness that a resumed run reproduces exactly."""

from __future__ import annotations

import os

import torch


def step_generator(step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded by (run seed, optimizer step, rank, stream).

    Lightning does not checkpoint the global RNG, so noise drawn from it after a resume differs from an
    uninterrupted run; drawing each step's noise, t and dropout from this generator makes the step a pure
    function of (seed, step, rank, batch). The run seed is the one `seed_everything` exported (`PL_GLOBAL_SEED`).
    """
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return torch.Generator().manual_seed(hash((seed, int(step), int(rank), int(stream))) & 0x7FFF_FFFF_FFFF_FFFF)
