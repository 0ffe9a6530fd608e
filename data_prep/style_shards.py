"""Copy clip shards with a strong, measurable look on every frame: the style set of a LoRA fine-tune demo.

    python data_prep/style_shards.py --input data/demo_shards --output data/style_shards --style warm

Every KEY.mp4 is decoded, graded (STYLES) and re-encoded to H.264 at its own fps; KEY.json (caption, fps, size,
...) is kept, plus "style". The shards keep their names and sample counts, each written atomically; manifest.json
(the input's, plus a "style" record with the mean style_score before and after) is written last. Captions are not
changed: training puts the trigger word in front (data.trigger, or a data.sources entry's trigger). The style's
statistic is `vidgen.eval.before_after.style_score` (mean R - B): on the demo clips "warm" raises it by 50-75 per
clip, "sepia" by 15-40 (sepia also desaturates, so already-yellow footage gains less).
`write_shard` / `finish_shards` also write data_prep/prior_shards.py's shards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from data_prep.make_shards import SHARD_RE, _add_member  # noqa: E402
from vidgen.data.shards import read_manifest  # noqa: E402
from vidgen.errors import UserError, one_line_errors  # noqa: E402
from vidgen.eval.before_after import style_score  # noqa: E402
from vidgen.io.atomic import atomic_path, atomic_write_text  # noqa: E402
from vidgen.io.video import encode_video, read_video  # noqa: E402

# The classic sepia matrix (rows: output R, G, B from input R, G, B): a grey pixel v becomes (1.35, 1.20, 0.94) v.
SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
WARM_GAIN = np.array([1.15, 1.0, 0.75], np.float32)  # a strong orange grade: red up, blue down
WARM_OFFSET = np.array([12.0, 0.0, -12.0], np.float32)


def sepia(frames: np.ndarray) -> np.ndarray:
    """uint8 `[T, H, W, 3]` -> the same frames in sepia tones (float result, 0-255 unclipped)."""
    return frames.astype(np.float32) @ SEPIA.T


def warm(frames: np.ndarray) -> np.ndarray:
    """uint8 `[T, H, W, 3]` -> a warm orange grade of them (float result, 0-255 unclipped)."""
    return frames.astype(np.float32) * WARM_GAIN + WARM_OFFSET


STYLES: dict[str, Callable[[np.ndarray], np.ndarray]] = {"sepia": sepia, "warm": warm}


class StyleError(UserError):
    """A style-shard setting or input that cannot work; the message names it."""


def apply_style(frames: np.ndarray, style: str, strength: float = 1.0) -> np.ndarray:
    """uint8 `[T, H, W, 3]` -> uint8 `[T, H, W, 3]`: the style blended in at `strength` (1: the full grade)."""
    graded = STYLES[style](frames)
    x = frames.astype(np.float32) + strength * (graded - frames.astype(np.float32))
    return np.clip(x.round(), 0, 255).astype(np.uint8)


def read_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A webdataset tar -> (key, {extension: bytes}) per sample (consecutive members sharing the key)."""
    with tarfile.open(tar_path) as tar:
        key, members = None, {}
        for m in tar:
            if not m.isfile():
                continue
            k, _, ext = m.name.partition(".")
            if members and k != key:
                yield key, members
                members = {}
            key, members[ext] = k, tar.extractfile(m).read()
        if members:
            yield key, members


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write one tar atomically (KEY.EXT members, fixed metadata as make_shards) -> the number of samples."""
    n = 0
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                _add_member(tar, f"{key}.{ext}", data)
            n += 1
    return n


def finish_shards(output: Path, manifest: dict) -> None:
    """Delete shards of an earlier, larger run in `output`, then write manifest.json (last: it marks completion)."""
    names = {s["name"] for s in manifest["shards"]}
    for p in output.iterdir():
        if SHARD_RE.match(p.name) and p.name not in names:
            p.unlink()
    atomic_write_text(output / "manifest.json", json.dumps(manifest, indent=2) + "\n")


def style_shards(input_dir: str | Path, output_dir: str | Path, style: str, strength: float = 1.0,
                 crf: int = 18) -> dict:
    """Copy the shards of `input_dir` to `output_dir` with `style` on every frame -> the new manifest."""
    src, out = Path(input_dir), Path(output_dir)
    if style not in STYLES:
        raise StyleError(f"--style={style}: expected one of {sorted(STYLES)}")
    if not 0 < strength <= 1:
        raise StyleError(f"--strength={strength}: expected a value in (0, 1]")
    if not src.is_dir():
        raise StyleError(f"--input={src}: no such shard folder")
    if src.resolve() == out.resolve():
        raise StyleError(f"--output={out}: must differ from --input")
    manifest = read_manifest(src)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # stale from here until the new one is written
    before, after = [], []

    def graded(samples: Iterable[tuple[str, dict[str, bytes]]]) -> Iterator[tuple[str, dict[str, bytes]]]:
        for key, members in samples:
            if "mp4" in members:
                frames, _ = read_video(members["mp4"])
                meta = json.loads(members.get("json", b"{}"))
                styled = apply_style(frames, style, strength)
                before.append(style_score(frames))
                after.append(style_score(styled))
                members = {**members, "mp4": encode_video(styled, meta.get("fps") or 25.0, crf=crf),
                           "json": json.dumps({**meta, "style": style}, sort_keys=True).encode()}
            yield key, members

    shards = []
    for shard in manifest["shards"]:
        path = src / shard["name"]
        if not path.is_file():
            raise StyleError(f"--input={src}: manifest.json lists {shard['name']}, which is missing")
        shards.append({**shard, "num_samples": write_shard(out / shard["name"], graded(read_samples(path)))})
    record = {"name": style, "strength": strength, "crf": crf, "input": str(src.resolve()),
              "statistic": "vidgen.eval.before_after.style_score (mean R - B, 0-255 frames)",
              "style_score_before": float(np.mean(before)) if before else None,
              "style_score_after": float(np.mean(after)) if after else None}
    new = {**manifest, "shards": shards, "num_samples": sum(s["num_samples"] for s in shards), "style": record}
    finish_shards(out, new)
    return new


def main(argv: list[str] | None = None) -> int:
    """CLI entry: write the styled shards, print one summary line -> exit code 0."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="clip shard folder (manifest.json + clips-*.tar)")
    p.add_argument("--output", required=True, help="folder for the styled shards")
    p.add_argument("--style", default="warm", choices=sorted(STYLES), help="the look put on every frame")
    p.add_argument("--strength", type=float, default=1.0, help="blend of the grade, (0, 1]")
    p.add_argument("--crf", type=int, default=18, help="H.264 quality (lower = better, bigger)")
    args = p.parse_args(argv)
    m = style_shards(args.input, args.output, args.style, args.strength, args.crf)
    s = m["style"]
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731
    print(f"{m['num_samples']} clips -> {args.output} (style {args.style}): style_score (mean R - B) "
          f"{fmt(s['style_score_before'])} -> {fmt(s['style_score_after'])}")
    return 0


if __name__ == "__main__":
    sys.exit(one_line_errors(main)())
