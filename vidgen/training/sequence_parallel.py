"""Sequence parallelism for the DiT's self-attention: DeepSpeed-Ulysses (Jacobs et al. 2023), all-to-all over heads.

The P ranks of a sequence-parallel group hold the same DiT and the same batch. After patchify each rank keeps one
contiguous 1/P of the frame-major tokens, `[B, N/P, D]`, and everything per token runs on that shard: adaLN
modulation of the token's frame, FFN, cross-attention to the whole text, RoPE at the token's global position. Only
self-attention needs every token, so it swaps the split from tokens to heads and back (`Attention.sp`):

    q, k, v [B, H, N/P, Dh] --all_to_all--> [B, H/P, N, Dh]     scatter heads, gather tokens
    SDPA over all N tokens (the whole block-causal mask for a causal DiT)
    out     [B, H/P, N, Dh] --all_to_all--> [B, H, N/P, Dh]     scatter tokens, gather heads

and the DiT all-gathers its output tokens before unpatchify, so its inputs and outputs are those of one process:

    enable_sequence_parallel(dit, group)   # group: the ProcessGroup of this rank's P ranks; None = off (default)

The model code (`vidgen.models`) never imports torch.distributed: the DiT and its attention layers call the
`SequenceParallel` object set on them (`dit.sp`, `attn1.sp`), which holds the group and the collectives.

Gradients: every rank of the group computes the same loss from the same (gathered) output. Each rank's parameter
gradients are then the share of its own tokens, and their SUM over the group is the single-process gradient (so
is the sum of the gradients w.r.t. the DiT's inputs). A data-parallel reducer that averages over every rank must
therefore see the loss multiplied by P.

Collectives: `all_to_all_single` (and `all_gather` for the output) on every backend, NCCL and gloo alike. gloo
implements `all_to_all_single` for CPU tensors (its `alltoall_base`, since PyTorch 1.7); what gloo lacks is the
list form `all_to_all` in older builds (pytorch#88245) and any all-to-all of CUDA tensors, neither used here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _exchange(x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split x into P chunks along `scatter_dim`, send chunk j to rank j, concatenate arrivals along `gather_dim`."""
    send = torch.stack(x.chunk(dist.get_world_size(group), dim=scatter_dim))  # [P, *chunk]: row j goes to rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's chunk for this rank
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """`_exchange` forward; its inverse (the same exchange with the two dims swapped) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _exchange(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None




class _GatherTokens(torch.autograd.Function):
    """All-gather of the token axis forward; this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Every rank's loss is the same function of the whole output, so its gradient is the same on every rank.
        rank = dist.get_rank(ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group), dim=1)[rank].contiguous(), None




class SequenceParallel:
    """This rank's place in a sequence-parallel group and its collectives, as the DiT and `Attention` call them."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def token_range(self, num_tokens: int) -> tuple[int, int]:
        """`(start, end)` of this rank's contiguous shard of `num_tokens` tokens."""
        if num_tokens % self.size:
            raise ValueError(f"sequence_parallel={self.size}: this latent has {num_tokens} tokens (T/pt * H/ph * "
                             f"W/pw), which do not divide into {self.size} equal shards")
        shard = num_tokens // self.size
        return self.rank * shard, (self.rank + 1) * shard

    def all_to_all(self, x: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        """Autograd-aware all-to-all: x's `scatter_dim` shrinks P times, its `gather_dim` grows P times (rank order).

        e.g. qkv `[3, B, H, N/P, Dh]` with (scatter_dim=2, gather_dim=3) -> `[3, B, H/P, N, Dh]`.
        """
        return _AllToAll.apply(x, self.group, scatter_dim, gather_dim)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's token shard `[B, N/P, ...]` -> all tokens `[B, N, ...]` in rank order (on every rank)."""
        return _GatherTokens.apply(x, self.group)


def enable_sequence_parallel(dit: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Split `dit`'s tokens over the ranks of `group` (None: every token on this rank, the default). In place.

    `dit` is a `vidgen.models.dit.DiT`: it shards its tokens itself (`dit.sp`), and each block's self-attention
    (`blocks[i].attn1.sp`) exchanges heads for tokens.
    """
    sp = SequenceParallel(group) if group is not None else None
    if sp is not None and dit.num_heads % sp.size:
        raise ValueError(f"sequence_parallel={sp.size}: num_heads={dit.num_heads} is not divisible by {sp.size} "
                         f"(each rank attends with num_heads / {sp.size} heads)")
    dit.sp = sp
    for block in dit.blocks:
        block.attn1.sp = sp
