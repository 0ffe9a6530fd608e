"""The batch-size search finds the exact boundary with few trials, and drives the real DiT training step."""

from __future__ import annotations

import torch

from vidgen.conditioning import Conditioner, TextCondition
from vidgen.models.dit import DiT
from vidgen.models.text import ByteTextEncoder
from vidgen.training.batch_search import dit_step_fn, largest_batch


def _capped(limit_bytes: int, trials: list[int]):
    """A real step whose working set grows with the batch; allocating past `limit_bytes` is an out-of-memory error."""
    def step(batch: int) -> None:
        trials.append(batch)
        if batch * 4 * 1024 * 1024 > limit_bytes:  # what the device allocator would refuse
            raise torch.OutOfMemoryError("simulated device limit")
        x = torch.randn(batch, 1024, 1024)  # 4 MiB per sample
        x.sum().item()
    return step


def test_largest_batch_finds_the_boundary():
    for limit_mib, expected in ((4 * 37, 37), (4 * 1, 1), (4 * 64, 64)):
        trials: list[int] = []
        assert largest_batch(_capped(limit_mib * 1024 * 1024, trials), limit=256) == expected
        assert len(trials) <= 2 * 8 + 1  # doubling + bisection: O(log limit) trials
    assert largest_batch(_capped(0, []), limit=256) == 0
    assert largest_batch(_capped(10**12, []), limit=16) == 16


def test_dit_step_fn_runs_a_training_step():
    from functools import partial

    from vidgen.training.dit_module import DiTModule

    dit = DiT(in_channels=4, dim=32, depth=1, num_heads=2, ffn_dim=64, text_dim=16, freq_dim=32)
    text = TextCondition(ByteTextEncoder(dim=16, depth=1, num_heads=2))
    module = DiTModule(dit=dit, conditioner=Conditioner(text=text), vae_path=None,
                       optimizer=partial(torch.optim.AdamW, lr=1e-3))
    before = dit.proj_out.weight.detach().clone()  # zero-initialised: the first step moves it
    dit_step_fn(module, (9, 32, 32), latent_channels=4, text_len=8, device=torch.device("cpu"))(2)
    assert not torch.equal(before, dit.proj_out.weight)
