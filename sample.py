"""Sample videos from a DiT: `python sample.py ckpt=PATH prompt="..."` (see configs/sample.yaml for every option).

`ckpt` is a DiT checkpoint (file, FSDP or DeepSpeed folder) or an export folder (python -m vidgen.io.checkpoint). Writes per prompt
`NAME.mp4`, `NAME.png` (contact sheet) and `NAME.json` (the exact settings) under `out_dir`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import hydra
from omegaconf import DictConfig
from tqdm.auto import tqdm

from vidgen.errors import one_line_errors
import vidgen.config  # noqa: F401  (registers the config resolvers)
from vidgen.io.prompts import read_prompt_file
from vidgen.io.video import read_image, read_video, save_sample, slug
from vidgen.pipeline import DiTPipeline, SamplingError


def read_prompts(cfg: DictConfig) -> list[dict]:
    """[{"prompt", "seed", "name"?}] from `prompt` or `prompts_file` (plain lines or JSONL)."""
    if (cfg.prompt is None) == (cfg.prompts_file is None):
        raise SamplingError("give exactly one of prompt=... or prompts_file=PATH")
    if cfg.prompt is not None:
        return [{"prompt": str(cfg.prompt), "seed": int(cfg.seed)}]
    return [{**item, "seed": int(item.get("seed", cfg.seed + item["line_index"]))}
            for item in read_prompt_file(cfg.prompts_file)]


def read_media(cfg: DictConfig) -> tuple:
    """The conditioning image (uint8 [1, H, W, 3]) and/or video (uint8 [T, H, W, 3]) files, or None."""
    for key in ("image", "video"):
        if cfg[key] is not None and not Path(cfg[key]).is_file():
            raise SamplingError(f"{key}={cfg[key]}: no such file")
    image = read_image(cfg.image) if cfg.image is not None else None
    video = read_video(cfg.video)[0] if cfg.video is not None else None
    return image, video


# What sample.py uses when neither the command line nor the checkpoint (e.g. an imported Wan) sets a value.
SAMPLING_FALLBACKS = {"steps": 50, "guidance": 5.0, "negative_prompt": "", "sampler": "euler", "shift": None}


def sampling_settings(cfg: DictConfig, defaults: dict) -> dict:
    """steps / guidance / negative_prompt / sampler / shift: the command line, else the checkpoint's, else ours."""
    return {k: cfg[k] if cfg[k] is not None else defaults.get(k, fallback) for k, fallback in SAMPLING_FALLBACKS.items()}


def sample_name(index: int, item: dict, settings: dict) -> str:
    """`NNN_prompt-slug_sSEED_HASH`: the prompt, its seed and a short hash of every other setting."""
    rest = {k: v for k, v in settings.items() if k not in ("prompt", "seed", "device")}
    digest = hashlib.sha1(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{index:03d}_{slug(item['prompt'])}_s{item['seed']}_{digest}"


def free_stem(folder: Path, stem: str) -> str:
    """`stem`, or `stem_2`, `stem_3`, ... so that no earlier sample in `folder` is ever overwritten."""
    candidate, n = stem, 1
    while (folder / f"{candidate}.mp4").exists() or (folder / f"{candidate}.json").exists():
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


def run(cfg: DictConfig) -> list[Path]:
    """Load the pipeline, generate every prompt in batches, write mp4 / png / json; returns the mp4 paths."""
    prompts = read_prompts(cfg)
    image, video = read_media(cfg)
    pipe = DiTPipeline.from_pretrained(cfg.ckpt, ema=cfg.ema, device=cfg.device, vae=cfg.vae)
    num_frames, height, width = (cfg[k] if cfg[k] is not None else pipe.defaults.get(k)
                                 for k in ("num_frames", "height", "width"))
    if None in (num_frames, height, width):
        raise SamplingError("num_frames, height and width: not recorded with the checkpoint; set them")
    pipe.latent_size(num_frames, height, width)  # bad sizes stop here, before any model runs
    sampling = sampling_settings(cfg, pipe.defaults)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    batches = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    for b, batch in enumerate(tqdm(batches, desc="prompts", disable=len(batches) == 1)):
        out = pipe([p["prompt"] for p in batch], num_frames, height, width, seed=[p["seed"] for p in batch],
                   image=image, video=video, video_frames=cfg.video_frames, progress=True, **sampling)
        for j, item in enumerate(batch):
            index = b * cfg.batch_size + j
            settings = {"prompt": item["prompt"], "seed": item["seed"], **out.settings, "fps": cfg.fps,
                        "ckpt": pipe.info.get("source"), "ema_used": pipe.info.get("ema_used"),
                        "global_step": pipe.info.get("global_step"), "image": cfg.image, "video": cfg.video,
                        "device": str(pipe.device)}
            stem = free_stem(out_dir, item.get("name") or sample_name(index, item, settings))
            save_sample(out_dir / stem, out.video[j], fps=cfg.fps)
            (out_dir / f"{stem}.json").write_text(json.dumps(settings, indent=2))
            written.append(out_dir / f"{stem}.mp4")
    print(f"wrote {len(written)} video(s) (mp4 + png contact sheet + json settings) to {out_dir.resolve()}")
    return written


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
@one_line_errors
def main(cfg: DictConfig) -> None:
    run(cfg)  # a bad setting or file: one `error: ...` line and exit 2 (vidgen.errors)


if __name__ == "__main__":
    main()
