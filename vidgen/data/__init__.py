"""Clip and latent shards -> one-shape batches: decoding (decord | PyAV), clip sampling, buckets, data modules.

Exports resolve lazily (PEP 562) so that light submodules (e.g. `vidgen.data.scan` in shard-writing
workers) do not pull in Lightning.
"""

from importlib import import_module

_EXPORTS = {
    "ShardDataModule": "base", "ClipBatch": "batches", "LatentBatch": "batches",
    "DROP_REASONS": "buckets", "Bucket": "buckets", "BucketAssigner": "buckets", "parse_buckets": "buckets",
    "to_bucket": "buckets", "DataStatsCallback": "callbacks", "ClipDataModule": "datamodule",
    "DecodeError": "decode", "VideoMeta": "decode", "decode_frames": "decode", "open_video": "decode",
    "probe_video": "decode", "LatentDataModule": "latents", "ClipLoader": "pipeline", "build_clip_dataset": "pipeline",
    "clip_indices": "sampling", "frame_step": "sampling", "max_clip_frames": "sampling",
    "DataConfigError": "shards", "resolve_shards": "shards", "DataStarvedError": "starvation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vidgen.data' has no attribute {name!r}")
    return getattr(import_module(f"vidgen.data.{_EXPORTS[name]}"), name)
