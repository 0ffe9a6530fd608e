"""Clip shards -> latent shards: a frozen VAE (and text encoder) run once, so DiT training never decodes video.

    python data_prep/encode_latents.py --shards shards/ --vae runs/vae/export --text-encoder byte runs/dit/text \
        --output latents/ --buckets 33x256x256 33x192x336 1x256x256 --target-fps 16 --batch-size 8
    torchrun --nproc_per_node 8 data_prep/encode_latents.py ...      # one shard set per rank

Frames come from the clip loader's own stages (vidgen.data.pipeline.ClipTransform in validation mode): the
bucket is chosen from the metadata as in training, the clip is the *centred* one at the target fps and the crop
is the *centre* crop, so a rerun gives the same latents. Each input shard `i` becomes one output shard
`latents-r{rank:02d}-{i:06d}.tar` (samples: see vidgen/data/latents.py), written atomically and then marked done
in `.done/{i:06d}.json`; a rerun skips done shards (whatever rank did them), and refuses an output folder made
with other settings (VAE, text encoder, buckets, inputs). Ranks split the input shards as `i % WORLD_SIZE`; no
process group is needed: the rank that finds every shard done writes `manifest.json` (num_samples, shards, drop
counts, VAE / text-encoder fingerprints). The "" caption's embedding goes to `null_text.safetensors`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from vidgen.errors import UserError  # noqa: E402
from vidgen.data.buckets import DROP_REASONS, BucketAssigner, parse_buckets  # noqa: E402
from vidgen.data.pipeline import ClipTransform, PipelineState, TarSamples, collate  # noqa: E402
from vidgen.data.shards import DataConfigError, resolve_shards  # noqa: E402
from vidgen.data.stats import WorkerCounts  # noqa: E402
from vidgen.conditioning import TextCondition  # noqa: E402
from vidgen.data.latent_shards import FORMAT_VERSION, SHARD_PATTERN, pack_sample, save_null_text  # noqa: E402
from vidgen.io.atomic import atomic_path, atomic_write_text  # noqa: E402
from vidgen.models.text import ByteTextEncoder, HFTextEncoder  # noqa: E402
from vidgen.models.vae import VideoVAE  # noqa: E402
from vidgen.io.fingerprint import fingerprint_folder, fingerprint_hf_folder  # noqa: E402
from vidgen.io.pretrained import load_pretrained

log = logging.getLogger("encode_latents")
DONE_DIR = ".done"
TAR_MTIME = 0.0  # fixed member times: a rerun writes byte-identical tars
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EncodeError(UserError):
    """A bad option or output folder, reported as one line by the CLI."""


# ---- frames: the clip pipeline's stages, one input shard at a time ----------------------------------------------
class ShardClips(torch.utils.data.IterableDataset):
    """Input shards -> per-shard one-bucket batches {"shard", "video" [B,3,T,H,W], "caption", "key", "fps", "meta"},
    then {"shard", "end": drop counts}. A shard is read whole by one DataLoader worker, so its batches (and the
    output tar) do not depend on the number of workers."""

    def __init__(self, jobs: list[tuple[int, str]], buckets, batch_size: int, target_fps: float | None,
                 frame_stride: int, max_upscale: float | None, decoder: str):
        self.jobs, self.buckets, self.batch_size = jobs, buckets, batch_size
        self.sampling = dict(target_fps=target_fps, frame_stride=frame_stride, max_upscale=max_upscale)
        self.decoder = decoder

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index, url in self.jobs[worker::workers]:
            yield from self.shard(index, url)

    def shard(self, index: int, url: str) -> Iterator[dict]:
        counts = WorkerCounts()
        transform = ClipTransform(BucketAssigner(self.buckets, **self.sampling), counts, PipelineState(0),
                                  train=False, seed=0, decoder=self.decoder)  # train=False: centred clip + crop
        pending: dict = defaultdict(list)
        for raw in TarSamples(counts)(iter([dict(url=url)])):
            out = transform.process(raw)
            if out is None:
                continue
            out["meta"] = json.loads(raw["json"])
            group = pending[out["bucket"]]
            group.append(out)
            if len(group) == self.batch_size:
                yield self._batch(index, group)
                group.clear()
        for bucket in sorted(pending):
            if pending[bucket]:
                yield self._batch(index, pending[bucket])
        yield {"shard": index, "end": dict(counts.counts)}

    @staticmethod
    def _batch(index: int, group: list[dict]) -> dict:
        b = group[0]["bucket"]  # the clip loader's own collate: video float32 [B, 3, T, H, W] in [-1, 1]
        return {**collate(group), "shard": index, "bucket": [b.frames, b.height, b.width],
                "meta": [s["meta"] for s in group]}


# ---- models --------------------------------------------------------------------------------------------------
def load_text_encoder(spec: list[str], device: torch.device, max_length: int | None):
    """`byte FOLDER` | `hf PATH` | `none` -> (the conditioner's frozen text entry or None, manifest entry or None)."""
    kind = spec[0] if spec else "none"
    if kind == "none":
        return None, None
    if kind not in ("byte", "hf") or len(spec) != 2:
        raise EncodeError(f"--text-encoder {' '.join(spec)}: expected 'byte FOLDER', 'hf PATH' or 'none'")
    path = str(Path(spec[1]).resolve())
    if not os.path.isdir(path):
        raise EncodeError(f"--text-encoder {kind} {spec[1]}: no such folder")
    if kind == "byte":
        fp = fingerprint_folder(path)
        extra = {} if max_length is None else {"max_length": max_length}
        encoder = load_pretrained(path, ByteTextEncoder, padding="longest", **extra)
    else:
        fp = fingerprint_hf_folder(path)
        encoder = HFTextEncoder(path, max_length=max_length or 512, padding="longest")
    encoder = encoder.to(device).eval().requires_grad_(False)
    encoder.trainable = False  # frozen here: the entry holds it aside, no gradients
    info = {"kind": kind, "path": path, "fingerprint": fp, "dim": int(encoder.dim),
            "max_length": int(encoder.max_length)}
    return TextCondition(encoder, dropout=0.0).to(device), info


def encode_text(entry: TextCondition, captions: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Captions -> per caption (emb [L_i, D], mask [L_i]) trimmed to its own tokens (padding is re-added per batch).

    The conditioner's text entry encodes exactly as training and sampling do; "" gives the stored null.
    """
    cond = entry.encode(captions)
    emb, mask = cond["context"], cond["context_mask"]
    out = []
    for e, m in zip(emb, mask):
        n = int(m.nonzero().max()) + 1 if m.any() else 1
        out.append((e[:n], m[:n]))
    return out


# ---- output folder -------------------------------------------------------------------------------------------
def options_digest(options: dict) -> str:
    """Hash of everything that changes the output's content: a rerun must match it to reuse done shards."""
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def read_markers(out: Path) -> dict[int, dict]:
    """Done markers {input shard index: marker}."""
    return {int(p.stem): json.loads(p.read_text()) for p in sorted((out / DONE_DIR).glob("*.json"))}


def check_output(out: Path, digest: str) -> None:
    markers = read_markers(out)
    other = {m["digest"] for m in markers.values()} - {digest}
    if other:
        raise EncodeError(f"--output {out}: holds latent shards made with other settings (VAE, text encoder, buckets, "
                          f"sampling or inputs differ: {sorted(other)[0]} != {digest}); use a new folder or delete it")


def write_manifest(out: Path, num_inputs: int, info: dict) -> dict | None:
    """manifest.json from the done markers once every input shard is done (any rank; same content) -> it or None."""
    markers = read_markers(out)
    if len(markers) < num_inputs:
        return None
    shards = [{"name": m["name"], "num_samples": m["num_samples"], "source": m["source"]}
              for _, m in sorted(markers.items()) if m["name"]]
    dropped = Counter()
    for m in markers.values():
        dropped.update(m["dropped"])
    manifest = {"format": FORMAT_VERSION, "num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                "dropped": {r: int(dropped.get(r, 0)) for r in DROP_REASONS + ("tar_error",)}, **info}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


# ---- the run -------------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun / SLURM-style env, or (0, 1, 0)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> dict | None:
    """Encode this rank's share of the input shards; returns the manifest if this rank completed the folder."""

    rank, world, local_rank = dist_info()
    device = pick_device(args.device, local_rank)
    out = Path(args.output)
    try:
        inputs = resolve_shards(args.shards, "--shards")
        buckets = parse_buckets(args.buckets)
        BucketAssigner(buckets, target_fps=args.target_fps, frame_stride=args.frame_stride)
    except (DataConfigError, ValueError) as e:
        raise EncodeError(str(e)) from e
    vae_path = str(Path(args.vae).resolve())
    try:
        vae_fp = fingerprint_folder(vae_path)
        vae = load_pretrained(vae_path, VideoVAE).to(device).eval().requires_grad_(False)
    except (FileNotFoundError, ValueError) as e:
        raise EncodeError(f"--vae {args.vae}: {e}") from e
    bad = [b.key for b in buckets if (b.frames - 1) % vae.temporal_factor or b.height % vae.spatial_factor
           or b.width % vae.spatial_factor]
    if bad:
        raise EncodeError(f"--buckets {bad}: the VAE needs 1 + {vae.temporal_factor}k frames and sides that are "
                          f"multiples of {vae.spatial_factor}")
    if not vae.has_latent_stats:
        log.warning("--vae %s has no measured latent statistics: latents are stored unnormalised", args.vae)
    text_encoder, text_info = load_text_encoder(args.text_encoder, device, args.text_max_length)

    info = {"vae": {"path": vae_path, "fingerprint": vae_fp, "latent_channels": vae.latent_channels,
                    "temporal_factor": vae.temporal_factor, "spatial_factor": vae.spatial_factor,
                    "latent_stats_measured": bool(vae.has_latent_stats)},
            "text_encoder": text_info, "null_text": "null_text.safetensors" if text_encoder else None,
            "options": {"buckets": [[b.frames, b.height, b.width] for b in buckets], "target_fps": args.target_fps,
                        "frame_stride": args.frame_stride, "max_upscale": args.max_upscale, "dtype": args.dtype,
                        "clip": "centre", "crop": "centre"},
            "inputs": [[os.path.basename(u), os.path.getsize(u)] for u in inputs.urls]}
    digest = options_digest({**info, "vae": vae_fp, "text_encoder": text_info and text_info["fingerprint"]})
    out.mkdir(parents=True, exist_ok=True)
    check_output(out, digest)
    if text_encoder is not None and not (out / "null_text.safetensors").is_file():
        with torch.inference_mode():
            (emb, mask), = encode_text(text_encoder, [""])
        save_null_text(out / "null_text.safetensors", emb.float(), mask)

    done = read_markers(out)
    jobs = [(i, u) for i, u in enumerate(inputs.urls) if i % world == rank and i not in done]
    log.info("rank %d/%d: %d input shard(s) to encode (%d already done) on %s", rank, world, len(jobs),
             sum(1 for i in done if i % world == rank), device)
    dataset = ShardClips(jobs, buckets, args.batch_size, args.target_fps, args.frame_stride, args.max_upscale,
                         args.decoder)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(args.num_workers, len(jobs)))
    dtype = DTYPES[args.dtype]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    bar = tqdm(total=len(jobs), unit="shard", disable=not args.progress, position=rank, desc=f"rank {rank}")
    open_: dict[int, tuple[contextlib.ExitStack, wds.TarWriter, str, int]] = {}
    written = 0
    try:
        for item in loader:
            index = item["shard"]
            if index not in open_:
                name = SHARD_PATTERN.format(rank=rank, index=index)
                for stale in out.glob(f".{name}.*.tmp"):  # left by a killed run: atomic_path never renamed it
                    stale.unlink()
                stack = contextlib.ExitStack()
                tmp = stack.enter_context(atomic_path(out / name))
                open_[index] = (stack, wds.TarWriter(str(tmp), mtime=TAR_MTIME), name, 0)
            stack, sink, name, count = open_[index]
            if "end" in item:
                sink.close()
                if count:
                    stack.close()  # fsync + rename into place
                else:
                    stack.__exit__(None, None, None)  # nothing kept: an empty tar is not worth a shard
                    (out / name).unlink(missing_ok=True)
                marker = {"index": index, "source": inputs.urls[index], "name": name if count else None,
                          "num_samples": count, "dropped": item["end"], "digest": digest}
                atomic_write_text(out / DONE_DIR / f"{index:06d}.json", json.dumps(marker))
                del open_[index]
                bar.update(1)
                continue
            with torch.inference_mode(), autocast:
                post = vae.encode(item["video"].to(device), normalize=vae.has_latent_stats,
                                  chunk_size=args.vae_chunk_size, tile_size=args.vae_tile_size)
                texts = encode_text(text_encoder, item["caption"]) if text_encoder is not None else None
            for j, key in enumerate(item["key"]):
                tensors = {"mean": post.mean[j].to(dtype), "logvar": post.logvar[j].to(dtype)}
                if texts is not None:
                    tensors["text_emb"], tensors["text_mask"] = texts[j][0].to(dtype), texts[j][1]
                meta = {"key": key, "caption": item["caption"][j], "fps": float(item["fps"][j]), "bucket": item["bucket"],
                        "latent_shape": list(post.mean.shape[1:]), "source_shard": os.path.basename(inputs.urls[index]),
                        "clip": item["meta"][j]}
                sink.write(pack_sample(key, tensors, meta))
            open_[index] = (stack, sink, name, count + len(item["key"]))
            written += len(item["key"])
            bar.set_postfix(samples=written)
    except BaseException:
        for stack, sink, _, _ in open_.values():  # unfinished shards: drop their temp files, write no marker
            sink.close()
            stack.__exit__(*sys.exc_info())
        raise
    finally:
        bar.close()
    manifest = write_manifest(out, len(inputs.urls), info)
    if manifest is None:
        log.info("rank %d done (%d samples); manifest.json is written by the last rank to finish", rank, written)
    return manifest


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, nargs="+", help="clip shard folder, .tar, glob or brace pattern")
    p.add_argument("--vae", required=True, help="VideoVAE export folder (save_pretrained)")
    p.add_argument("--text-encoder", nargs="+", default=["none"], metavar="KIND [PATH]",
                   help="'byte FOLDER' (ByteTextEncoder export), 'hf PATH' (local HF encoder) or 'none' (captions only)")
    p.add_argument("--text-max-length", type=int, default=None, help="token limit (default: the encoder's)")
    p.add_argument("--output", required=True, help="latent shard folder")
    p.add_argument("--buckets", nargs="+", required=True, help="TxHxW buckets, e.g. 33x256x256 1x256x256")
    p.add_argument("--target-fps", type=float, default=None)
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--max-upscale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers decoding input shards")
    p.add_argument("--decoder", default="decord", choices=("decord", "pyav"))
    p.add_argument("--device", default="auto", help="auto = cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="VAE / text encoder autocast")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the stored tensors")
    p.add_argument("--vae-chunk-size", type=int, default=None, help="latent frames per chunk (bounded memory)")
    p.add_argument("--vae-tile-size", type=int, default=None, help="spatial tile in pixels (bounded memory)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    args.shards = args.shards[0] if len(args.shards) == 1 else args.shards
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        manifest = run(parse_args(argv))
    except EncodeError as e:
        print(f"encode_latents: {e}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(f"wrote {manifest['num_samples']} latent samples in {len(manifest['shards'])} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
