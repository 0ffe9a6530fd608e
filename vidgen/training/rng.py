"""Per-micro-batch random generators: training randomness that a resumed run reproduces exactly."""

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


class MicroBatchCounter:
    """Which micro-batch of the current optimizer step this is: 0, 1, ... until `global_step` advances.

    With gradient accumulation several training steps share one `global_step`; keying their generators on
    (step, micro-batch) gives each its own t and noise. Checkpoints fall on optimizer-step boundaries, so a
    resumed run restarts at micro-batch 0 exactly as the uninterrupted run did.
    """

    def __init__(self) -> None:
        self.step, self.index = -1, 0

    def generator(self, step: int, rank: int = 0) -> torch.Generator:
        """The generator of the next micro-batch of optimizer step `step` on `rank`."""
        self.index = self.index + 1 if step == self.step else 0
        self.step = step
        return step_generator(step, rank, stream=self.index)
