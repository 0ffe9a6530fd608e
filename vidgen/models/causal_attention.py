"""Block-causal attention over chunks of latent frames, and the KV cache that streams it.

A causal DiT (`DiT(attention="causal", chunk_frames=c, window_chunks=W, sink_chunks=S)`) groups its latent frames
into chunks of `c` frames. A token of chunk q sees the tokens of chunk k when

    k <= q  and  (q - k < W  or  k < S)        (W = None: every earlier chunk)

i.e. its own chunk in full, the W - 1 chunks before it, and the first S chunks ("attention sinks", StreamingLLM,
Xiao et al. 2023; LongLive keeps the first frames the same way). In training the whole clip goes through the
network at once under `block_causal_mask`; in streaming one chunk at a time goes through with a `KVCache` holding
the keys and values (RoPE already applied, so positions keep counting) of the earlier chunks it may see. Both
compute the same function: the cached rollout equals recomputing every chunk over the whole past.

    cache = KVCache(depth, window_chunks=W, sink_chunks=S)
    v = dit(chunk, t, **cond, kv_cache=cache, frame_offset=c * q)   # attends to cache + itself, stores nothing
    dit(clean_chunk, 0, **cond, kv_cache=cache, frame_offset=c * q); cache.commit(q)   # the past grows by one chunk

Memory and time per chunk are flat in length once W chunks are cached: `commit` drops what no later chunk sees.
"""

from __future__ import annotations

import torch

ATTENTION_MODES = ("full", "causal")


def chunk_visible(q: int, k: int, window_chunks: int | None, sink_chunks: int) -> bool:
    """Whether chunk `q` attends to chunk `k` (the rule above, written once)."""
    return k <= q and (window_chunks is None or q - k < window_chunks or k < sink_chunks)


def block_causal_mask(num_chunks: int, tokens_per_chunk: int, window_chunks: int | None = None,
                      sink_chunks: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """Boolean SDPA mask `[N, N]` (True = attend), N = num_chunks * tokens_per_chunk, tokens chunk-major."""
    chunk = torch.arange(num_chunks, device=device)
    q, k = chunk[:, None], chunk[None, :]
    visible = k <= q
    if window_chunks is not None:
        visible &= (q - k < window_chunks) | (k < sink_chunks)
    return visible.repeat_interleave(tokens_per_chunk, 0).repeat_interleave(tokens_per_chunk, 1)


class LayerKV:
    """One attention layer's cache: keys/values `[B, heads, n, Dh]` per committed chunk, plus the pending chunk."""

    def __init__(self) -> None:
        self.chunks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def attend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This chunk's k, v -> (cached + this chunk's keys, values) along the token axis; this chunk is pending."""
        self.pending = (k, v)
        if not self.chunks:
            return k, v
        ks, vs = zip(*(self.chunks[i] for i in sorted(self.chunks)))
        return torch.cat([*ks, k], dim=2), torch.cat([*vs, v], dim=2)


class KVCache:
    """Keys and values of the clean chunks a causal DiT has seen, for each of its `depth` blocks.

    `commit(index)` stores the pending keys/values (those of the last forward) as chunk `index` and drops every
    chunk that no chunk after `index` can see (`chunk_visible`); `reset()` empties it (a prompt switch re-fills
    it with the new text, `vidgen.diffusion.streaming`).
    """

    def __init__(self, depth: int, window_chunks: int | None = None, sink_chunks: int = 0):
        if window_chunks is not None and window_chunks < 1:
            raise ValueError(f"window_chunks={window_chunks}: expected >= 1 (or None: unbounded)")
        self.window_chunks, self.sink_chunks = window_chunks, sink_chunks
        self.layers = [LayerKV() for _ in range(depth)]
        self.next_chunk = 0

    def commit(self, index: int) -> None:
        """The last forward was chunk `index`, clean: keep its keys/values; forget what chunk index + 1 cannot see."""
        for layer in self.layers:
            if layer.pending is None:
                raise RuntimeError("KVCache.commit: no forward pass since the last commit")
            layer.chunks[index] = layer.pending
            layer.pending = None
            for old in [i for i in layer.chunks if not chunk_visible(index + 1, i, self.window_chunks,
                                                                     self.sink_chunks)]:
                del layer.chunks[old]
        self.next_chunk = index + 1

    def reset(self) -> None:
        for layer in self.layers:
            layer.chunks.clear()
            layer.pending = None
        self.next_chunk = 0

    @property
    def cached_chunks(self) -> list[int]:
        return sorted(self.layers[0].chunks) if self.layers else []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for kv in layer.chunks.values() for t in kv)
