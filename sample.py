"""Sample videos from a DiT: `python sample.py ckpt=PATH prompt="..."` (see configs/sample.yaml for every option).

`ckpt` is a DiT checkpoint (file, FSDP or DeepSpeed folder) or an export folder (python -m vidgen.io.checkpoint). Writes per prompt
`NAME.mp4`, `NAME.png` (contact sheet) and `NAME.json` (the exact settings) under `out_dir`. A joint audio + video
checkpoint also samples sound: the mp4 gets an AAC track and `NAME.wav` sits beside it, at the frame rate of the
checkpoint's audio clock (not `fps`); with `video=CLIP` (and no `video_frames`) it generates the clip's sound, with
`audio=FILE` (a WAV, FLAC or any media file with a soundtrack) the picture for that sound (audio-to-video).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from vidgen.data.audio import read_audio
from vidgen.data.sampling import frame_offset, frame_step, max_clip_frames
from vidgen.errors import one_line_errors
import vidgen.config  # noqa: F401  (registers the config resolvers)
from vidgen.io.prompts import read_prompt_file
from vidgen.io.video import VideoWriter, contact_sheet, read_image, read_video, save_sample, slug, to_uint8_video
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
    video, fps = read_video(cfg.video) if cfg.video is not None else (None, None)
    return image, video, fps


def at_clock(video: np.ndarray, src_fps: float, fps: float) -> np.ndarray:
    """A joint checkpoint's sound runs on its clock (`fps`): the clip's frames at that rate, the nearest source frame
    per output frame as the training loader takes them (`vidgen.data.sampling`); a slower clip stays as it is."""
    step = frame_step(src_fps, fps)
    return video[[frame_offset(i, step) for i in range(max_clip_frames(len(video), step))]]


def read_sound(cfg: DictConfig, pipe: DiTPipeline, num_frames: int) -> torch.Tensor | None:
    """`audio=FILE`: its soundtrack at the audio VAE's rate and channels, the first `num_frames` frames' worth at the
    checkpoint's clock -> float [C, S] in [-1, 1]; None without `audio=`."""
    if cfg.audio is None:
        return None
    if not Path(cfg.audio).is_file():
        raise SamplingError(f"audio={cfg.audio}: no such file")
    if not pipe.joint:
        raise SamplingError(f"audio={cfg.audio}: audio-to-video needs a joint audio + video checkpoint; {cfg.ckpt} "
                            "has no audio stream")
    rate, channels = pipe.audio_vae.sample_rate, pipe.audio_vae.in_channels
    try:
        wave = read_audio(cfg.audio, rate, channels)
    except Exception as e:  # av.FFmpegError, ValueError: the file is not decodable sound
        raise SamplingError(f"audio={cfg.audio}: its sound does not decode ({e})") from None
    if wave is None:
        raise SamplingError(f"audio={cfg.audio}: the file has no audio stream")
    need = round(num_frames * rate / pipe.fps)
    if wave.pcm.shape[1] < need:
        raise SamplingError(f"audio={cfg.audio}: {wave.pcm.shape[1] / rate:.2f} s of sound; num_frames={num_frames} "
                            f"at {pipe.fps:g} fps needs {need / rate:.2f} s (lower num_frames)")
    return torch.from_numpy(wave.pcm[:, :need].astype(np.float32) / 32767.0)


# What sample.py uses when neither the command line nor the checkpoint (e.g. an imported Wan) sets a value.
SAMPLING_FALLBACKS = {"steps": 50, "guidance": 5.0, "negative_prompt": "", "sampler": "euler", "shift": None,
                      "step_cache": None}


def sampling_settings(cfg: DictConfig, defaults: dict) -> dict:
    """steps / guidance / negative_prompt / sampler / shift / step_cache: the command line, else the checkpoint's,
    else ours."""
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


def prompt_schedule(cfg: DictConfig) -> list[tuple[float, str]]:
    """mode=stream: [(at_seconds, prompt)] from `prompts=[{at, prompt}, ...]` or the single `prompt`."""
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise SamplingError("mode=stream: give exactly one of prompt=... or prompts=[{at: 0, prompt: ...}, ...]")
    if cfg.prompts is None:
        return [(0.0, str(cfg.prompt))]
    schedule = []
    for i, item in enumerate(cfg.prompts):
        if not hasattr(item, "get") or item.get("prompt") is None or item.get("at") is None:
            raise SamplingError(f"prompts[{i}]={item}: expected {{at: SECONDS, prompt: TEXT}}")
        schedule.append((float(item["at"]), str(item["prompt"])))
    return schedule


def run_stream(cfg: DictConfig, pipe: DiTPipeline, video, height: int, width: int, sampling: dict) -> Path:
    """mode=stream: frames written to the mp4 as they are made; a contact sheet of one frame per second; json."""
    schedule = prompt_schedule(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"mode": "stream", "prompts": [{"at": at, "prompt": p} for at, p in schedule], "seed": cfg.seed,
                "seconds": cfg.seconds, "fps": cfg.fps, "height": height, "width": width, **sampling,
                "attention": {k: pipe.dit.config.get(k) for k in ("attention", "chunk_frames", "window_chunks",
                                                                   "sink_chunks")},
                "ckpt": pipe.info.get("source"), "video": cfg.video, "device": str(pipe.device)}
    stem = free_stem(out_dir, sample_name(0, {"prompt": schedule[0][1], "seed": cfg.seed}, settings))
    total = max(1, round(cfg.seconds * cfg.fps))
    thumbs, start = [], time.perf_counter()
    first = None
    bar = tqdm(total=total, unit="frame", desc="stream", mininterval=2.0)
    with VideoWriter(out_dir / f"{stem}.mp4", fps=cfg.fps) as writer:
        for x, info in pipe.stream(schedule, cfg.seconds, cfg.fps, height, width, seed=cfg.seed,
                                   video=video, video_frames=cfg.video_frames, **sampling):
            frames = to_uint8_video(x[0])  # [f, H, W, 3]
            writer.write(frames)
            first = first if first is not None else time.perf_counter() - start
            done = info["frames"]
            thumbs += [frames[i] for i in range(len(frames)) if (done - len(frames) + i) % max(1, round(cfg.fps)) == 0]
            if info["prompt"] != bar.postfix:
                bar.set_postfix_str(info["prompt"][:40], refresh=False)
            bar.update(len(frames))
    bar.close()
    elapsed = time.perf_counter() - start
    settings.update({"frames": writer.frames, "wall_s": round(elapsed, 2), "frames_per_s": round(writer.frames / elapsed, 2),
                     "first_frame_s": round(first, 3), "shift": info["shift"]})
    contact_sheet(np.stack(thumbs), max_frames=len(thumbs), columns=10).save(out_dir / f"{stem}.png")
    (out_dir / f"{stem}.json").write_text(json.dumps(settings, indent=2))
    print(f"streamed {writer.frames} frames ({writer.frames / cfg.fps:.1f} s at {cfg.fps} fps) in {elapsed:.1f} s "
          f"({writer.frames / elapsed:.1f} frames/s, first frame after {first:.2f} s) to {(out_dir / stem).resolve()}.mp4")
    return out_dir / f"{stem}.mp4"


def run(cfg: DictConfig) -> list[Path]:
    """Load the pipeline, generate every prompt in batches, write mp4 / png / json; returns the mp4 paths."""
    if cfg.mode not in ("window", "stream"):
        raise SamplingError(f"mode={cfg.mode}: expected window or stream")
    prompts = read_prompts(cfg) if cfg.mode == "window" else None
    image, video, video_fps = read_media(cfg)
    pipe = DiTPipeline.from_pretrained(cfg.ckpt, ema=cfg.ema, device=cfg.device, vae=cfg.vae)
    num_frames, height, width = (cfg[k] if cfg[k] is not None else pipe.defaults.get(k)
                                 for k in ("num_frames", "height", "width"))
    if pipe.joint and video is not None and video_fps and abs(video_fps - pipe.fps) > 1e-3:
        video = at_clock(video, video_fps, pipe.fps)
        print(f"video={cfg.video}: {video_fps:g} fps, taken at the checkpoint's {pipe.fps:g} fps (its sound's clock): "
              f"{len(video)} frames")
    whole_clip = cfg.strength is not None or (pipe.joint and cfg.video_frames is None)  # remix / video-to-audio
    if whole_clip and cfg.num_frames is None and video is not None:  # the whole clip
        num_frames = 1 + (video.shape[0] - 1) // pipe.vae.temporal_factor * pipe.vae.temporal_factor
    if cfg.mode == "stream":
        if None in (height, width):
            raise SamplingError("height and width: not recorded with the checkpoint; set them")
        if image is not None or cfg.strength is not None:
            raise SamplingError("mode=stream: image= and strength= are window-mode settings (stream takes video= "
                                "to extend)")
        if cfg.step_cache is not None:
            raise SamplingError("mode=stream: step_cache= is a window-mode setting (the streaming sampler has none)")
        if cfg.audio is not None:
            raise SamplingError("mode=stream: audio= (audio-to-video) is a window-mode setting")
        sampling = sampling_settings(cfg, pipe.defaults)
        del sampling["step_cache"]  # a checkpoint's default applies to window mode only
        return [run_stream(cfg, pipe, video, height, width, sampling)]
    if None in (num_frames, height, width):
        raise SamplingError("num_frames, height and width: not recorded with the checkpoint; set them")
    pipe.latent_size(num_frames, height, width)  # bad sizes stop here, before any model runs
    sound = read_sound(cfg, pipe, num_frames)
    sampling = sampling_settings(cfg, pipe.defaults)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fps = pipe.fps or cfg.fps  # a joint checkpoint's frames keep its audio clock
    if pipe.joint and abs(fps - cfg.fps) > 1e-6:
        print(f"joint audio + video checkpoint: writing at its {fps:g} fps (the audio clock), not fps={cfg.fps}")
    batches = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    for b, batch in enumerate(tqdm(batches, desc="prompts", disable=len(batches) == 1)):
        out = pipe([p["prompt"] for p in batch], num_frames, height, width, seed=[p["seed"] for p in batch],
                   image=image, video=video, video_frames=cfg.video_frames, strength=cfg.strength, progress=True,
                   audio=sound, **sampling)
        for j, item in enumerate(batch):
            index = b * cfg.batch_size + j
            settings = {"prompt": item["prompt"], "seed": item["seed"], **out.settings, "fps": fps,
                        "ckpt": pipe.info.get("source"), "ema_used": pipe.info.get("ema_used"),
                        "global_step": pipe.info.get("global_step"), "image": cfg.image, "video": cfg.video,
                        "video_fps": video_fps, "audio": cfg.audio, "device": str(pipe.device)}
            stem = free_stem(out_dir, item.get("name") or sample_name(index, item, settings))
            save_sample(out_dir / stem, out.video[j], fps=fps, audio=None if out.audio is None else out.audio[j],
                        audio_rate=out.audio_rate)
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
