"""Text/image/video -> video with a trained DiT: load a checkpoint or export folder, sample, decode, save.

`DiTPipeline.from_pretrained(path)` rebuilds the DiT, text encoder, flow objective and VAE from what a DiT
Lightning checkpoint (`vidgen.training.dit_module`) or an export folder (`vidgen.training.export_dit`) holds;
calling the pipeline runs `vidgen.diffusion.sampling.generate` (the same denoiser call as the training loss) and
decodes with the VAE. `sample.py` and the sample-logging callback both use it.

Export folder layout (`vidgen.json` kind "dit_export"):
    dit/ (config.json + model.safetensors)   text_encoder/ (config.json [+ model.safetensors if trained])
    flow.json (RectifiedFlow kwargs)          vae.json (VAE path + fingerprint)   [vae/ (a copy of the VAE)]
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import vidgen.models.text as text_models
from vidgen.data.buckets import Bucket, to_bucket
from vidgen.diffusion.flow import RectifiedFlow, num_latent_tokens
from vidgen.diffusion.sampling import SAMPLERS, generate
from vidgen.eval.vae import to_uint8_video
from vidgen.models.dit import DiT
from vidgen.models.pretrained import CONFIG_NAME, WEIGHTS_NAME
from vidgen.models.vae import VideoVAE

EXPORT_KIND = "dit_export"


class SamplingError(ValueError):
    """A setting or input that cannot be sampled from; the message names it and what was expected."""


@dataclass
class ModelParts:
    """Everything needed to rebuild a pipeline, read from a checkpoint or an export folder."""

    dit_config: dict[str, Any]
    dit_state: dict[str, torch.Tensor]
    text_spec: dict[str, Any]                      # {"class", "config", "trainable"}
    text_state: dict[str, torch.Tensor] | None     # None: a frozen encoder that loads its own weights
    flow: dict[str, Any]
    vae: dict[str, Any]                            # {"path", "fingerprint"}
    info: dict[str, Any] = field(default_factory=dict)  # source, ema_used, global_step, default_shape


# ---------------------------------------------------------------------------------------------- reading
def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _default_shape(run_config: dict | None) -> list[int] | None:
    """[frames, height, width] of the first multi-frame training bucket in a run config (None if unknown)."""
    buckets = ((run_config or {}).get("data") or {}).get("buckets") or []
    videos = [list(map(int, b)) for b in buckets if isinstance(b, (list, tuple)) and len(b) == 3 and int(b[0]) > 1]
    return videos[0] if videos else None


def read_checkpoint(path: str | os.PathLike, ema: bool = True) -> ModelParts:
    """Parts of a DiT Lightning checkpoint; EMA weights (when saved and `ema`) replace the trained ones."""
    from vidgen.training.callbacks import ema_state_from_checkpoint
    from vidgen.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    meta = ckpt.get("vidgen") or {}
    kind = meta.get("task") or ("dit" if "dit_config" in ckpt else "vae" if "vae_config" in ckpt else "unknown")
    if kind != "dit" or "dit_config" not in ckpt:
        raise SamplingError(f"ckpt={path}: a '{kind}' checkpoint, expected a 'dit' checkpoint or export folder")
    state = dict(ckpt["state_dict"])
    shadow = ema_state_from_checkpoint(ckpt) if ema else None
    if shadow:  # EMA covers the trainable parameters; buffers come from the state dict
        state.update({k: v.to(state[k].dtype) for k, v in shadow.items() if k in state})
    text = ckpt["text_encoder"]
    info = {"source": str(Path(path).resolve()), "ema_used": bool(shadow), "global_step": ckpt.get("global_step"),
            "default_shape": _default_shape(meta.get("config"))}
    return ModelParts(ckpt["dit_config"], _sub_state(state, "dit."), text,
                      _sub_state(state, "text_encoder.") if text.get("trainable") else None,
                      ckpt["flow"], ckpt["vae"] or {}, info)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SamplingError(f"ckpt={path.parent}: incomplete DiT export folder (missing {path.name})")
    return json.loads(path.read_text())


def read_export(folder: str | os.PathLike) -> ModelParts:
    """Parts of an export folder written by `vidgen.training.export_dit` (checks the folder kind)."""
    folder = Path(folder)
    if not (folder / "vidgen.json").is_file():
        config = folder / CONFIG_NAME
        kind = "vae" if config.is_file() and json.loads(config.read_text()).get("class", "").endswith("VideoVAE") \
            else "unknown"
        raise SamplingError(f"ckpt={folder}: a '{kind}' folder, expected a 'dit' checkpoint or export folder "
                            f"(vidgen.json + dit/ from python -m vidgen.training.export_dit)")
    meta = _read_json(folder / "vidgen.json")
    if meta.get("kind") != EXPORT_KIND:
        raise SamplingError(f"ckpt={folder}: a '{meta.get('kind')}' folder, expected a 'dit' checkpoint or export "
                            f"folder")
    from safetensors.torch import load_file

    dit_meta = DiT.read_config(folder / "dit")
    text_spec = _read_json(folder / "text_encoder" / CONFIG_NAME)
    text_weights = folder / "text_encoder" / WEIGHTS_NAME
    vae = _read_json(folder / "vae.json")
    if (folder / "vae").is_dir():
        vae = {**vae, "path": str(folder / "vae")}
    return ModelParts(dit_meta["config"], load_file(str(folder / "dit" / WEIGHTS_NAME)), text_spec,
                      load_file(str(text_weights)) if text_weights.is_file() else None,
                      _read_json(folder / "flow.json")["kwargs"], vae, {**meta, "source": str(folder.resolve())})


def build_text_encoder(spec: dict[str, Any], state: dict[str, torch.Tensor] | None) -> nn.Module:
    """Rebuild a `vidgen.models.text` encoder from its recorded class + config (+ weights when it was trained)."""
    module, _, name = spec["class"].rpartition(".")
    if module != text_models.__name__ or not hasattr(text_models, name):
        raise SamplingError(f"unknown text encoder class {spec['class']!r} (expected one in {text_models.__name__})")
    encoder = getattr(text_models, name)(**spec["config"])
    if state is not None:
        encoder.load_state_dict(state, strict=True)
    return encoder


def resolve_vae(ref: dict[str, Any], override: str | os.PathLike | None = None) -> VideoVAE:
    """Load the VAE a DiT was trained with (or `override`), refusing one whose fingerprint differs."""
    from vidgen.training.dit_module import vae_fingerprint

    folder = Path(override or ref.get("path") or "")
    if not (folder / CONFIG_NAME).is_file():
        raise SamplingError(f"VAE folder {folder} (recorded with the DiT) not found; pass vae=PATH to its export")
    expected, found = ref.get("fingerprint"), vae_fingerprint(folder)
    if expected and found != expected:
        raise SamplingError(f"VAE at {folder} has fingerprint {found}, but the DiT was trained with {expected} "
                            f"({ref.get('path')}); pass vae=PATH to that VAE")
    return VideoVAE.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- media helpers
def contact_sheet(frames: np.ndarray, max_frames: int = 18, columns: int = 9, gap: int = 2):
    """PIL image: up to `max_frames` evenly spaced frames of `[T, H, W, 3]` in a grid of `columns`."""
    from PIL import Image

    t, h, w, _ = frames.shape
    idx = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
    cols = min(columns, len(idx))
    rows = -(-len(idx) // cols)
    sheet = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for n, i in enumerate(idx):
        r, c = divmod(n, cols)
        sheet[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = frames[i]
    return Image.fromarray(sheet)


def slug(text: str, length: int = 40) -> str:
    """A file-name-safe prefix of a prompt: "A red car!" -> "a_red_car"."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower())[:length].strip("_")


def save_sample(stem: str | os.PathLike, video: torch.Tensor, fps: float) -> tuple[Path, Path]:
    """Write `STEM.mp4` (H.264) and `STEM.png` (contact sheet) for a video `[3, T, H, W]` in [-1, 1]."""
    from vidgen.io.video import write_video

    stem = Path(stem)
    frames = to_uint8_video(video)  # [T, H, W, 3]
    mp4 = write_video(stem.with_suffix(".mp4"), frames, fps=fps)
    png = stem.with_suffix(".png")
    contact_sheet(frames).save(png)
    return mp4, png


# ---------------------------------------------------------------------------------------------- the pipeline
@dataclass
class SampleOutput:
    """Generated videos `[B, 3, T, H, W]` in [-1, 1], their latents `[B, C, t, h, w]` and the settings used."""

    video: torch.Tensor
    latents: torch.Tensor
    settings: dict[str, Any]


class DiTPipeline:
    """DiT + text encoder + flow + VAE: `pipe(prompts, num_frames, height, width, ...) -> SampleOutput`."""

    def __init__(self, dit: DiT, text_encoder: nn.Module, vae: VideoVAE, flow: RectifiedFlow,
                 info: dict[str, Any] | None = None):
        self.dit, self.text_encoder, self.vae, self.flow = dit, text_encoder, vae, flow
        self.info = dict(info or {})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, ema: bool = True, device: str | torch.device = "auto",
                        vae: str | os.PathLike | None = None) -> DiTPipeline:
        """Load a DiT `.ckpt` or export folder; `vae` overrides the recorded VAE folder (fingerprint-checked)."""
        path = Path(path)
        if not path.exists():
            raise SamplingError(f"ckpt={path}: no such checkpoint file or export folder")
        parts = read_export(path) if path.is_dir() else read_checkpoint(path, ema=ema)
        dit = DiT(**parts.dit_config)
        dit.load_state_dict(parts.dit_state, strict=True)
        pipe = cls(dit, build_text_encoder(parts.text_spec, parts.text_state), resolve_vae(parts.vae, vae),
                   RectifiedFlow(**parts.flow), parts.info)
        return pipe.to(device)

    def to(self, device: str | torch.device = "auto") -> DiTPipeline:
        """Move every part to `device` ("auto": CUDA when available) in eval mode."""
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        for m in (self.dit, self.text_encoder, self.vae):
            m.to(device).eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the DiT and text encoder on CUDA (the VAE decodes in fp32); no-op on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ shapes and conditioning
    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Pixel (frames, height, width) -> latent (t, h, w); one clear error when the VAE/DiT cannot make it."""
        try:
            t = self.vae.latent_frames(num_frames)
        except ValueError as e:
            raise SamplingError(f"num_frames={num_frames}: {e}") from None
        m = self.vae.spatial_factor * max(self.dit.patch_size[1:])
        if height % m or width % m or height < m or width < m:
            raise SamplingError(f"height={height}, width={width}: both must be positive multiples of {m} "
                                f"(VAE {self.vae.spatial_factor}x times DiT patch {tuple(self.dit.patch_size[1:])})")
        if t % self.dit.patch_size[0]:
            raise SamplingError(f"num_frames={num_frames}: {t} latent frames, not a multiple of the DiT's temporal "
                                f"patch {self.dit.patch_size[0]}")
        s = self.vae.spatial_factor
        return t, height // s, width // s

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompts -> {"context" [B, L, D], "context_mask" [B, L]} on the pipeline's device."""
        with torch.no_grad(), self.autocast():
            context, mask = self.text_encoder(list(prompts))
        return {"context": context.float(), "context_mask": mask}

    @torch.no_grad()
    def encode_frames(self, frames: np.ndarray, height: int, width: int) -> torch.Tensor:
        """uint8 frames `[T, H, W, 3]` (T = 1 + 4k) -> normalised latents `[1, C, 1 + k, h, w]` (resize + crop)."""
        x = to_bucket(np.asarray(frames), Bucket(frames.shape[0], height, width))  # [3, T, H, W] in [-1, 1]
        return self.vae.encode(x[None].to(self.device), normalize=True).mode()

    def clean_latents(self, image: np.ndarray | None, video: np.ndarray | None, video_frames: int | None,
                      num_frames: int, height: int, width: int) -> tuple[torch.Tensor | None, int]:
        """Latents held clean and how many latent frames: the image as frame 0, or the first frames of a video."""
        if image is not None and video is not None:
            raise SamplingError("image and video given: choose image-to-video or video extension")
        if image is not None:
            return self.encode_frames(np.asarray(image).reshape(1, *np.asarray(image).shape[-3:]), height, width), 1
        if video is None:
            return None, 0
        total = self.vae.latent_frames(num_frames)
        if video_frames is None:  # default: hold the first half of the latent frames
            video_frames = self.vae.pixel_frames(max(1, total // 2))
        try:
            k = self.vae.latent_frames(video_frames)
        except ValueError as e:
            raise SamplingError(f"video_frames={video_frames}: {e}") from None
        if k >= total or video.shape[0] < video_frames:
            raise SamplingError(f"video_frames={video_frames}: needs fewer than num_frames={num_frames} frames and "
                                f"at most the {video.shape[0]} frames of the given video")
        # Causal VAE: the latents of the first 1 + 4(k-1) frames are the first k latent frames of the whole clip.
        return self.encode_frames(video[:video_frames], height, width), k

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], num_frames: int, height: int, width: int, steps: int = 50,
                 guidance: float = 5.0, negative_prompt: str = "", seed: int | Sequence[int] = 0,
                 sampler: str = "euler", shift: float | None = None, image: np.ndarray | None = None,
                 video: np.ndarray | None = None, video_frames: int | None = None,
                 progress: bool = False) -> SampleOutput:
        """Generate one video per prompt; `seed` int (prompt i uses seed + i) or one per prompt."""
        if sampler not in SAMPLERS:
            raise SamplingError(f"sampler={sampler}: expected one of {sorted(SAMPLERS)}")
        t, h, w = self.latent_size(num_frames, height, width)
        shape = (len(prompts), self.dit.in_channels, t, h, w)
        if shift is None:  # the resolution-dependent shift the objective trained with (SD3 Sec. 5.3.2)
            shift = self.flow.shift_for(num_latent_tokens(shape, self.dit.patch_size))
        clean, num_clean = self.clean_latents(image, video, video_frames, num_frames, height, width)
        cond = self.encode_prompts(prompts)
        neg = self.encode_prompts([negative_prompt]) if guidance != 1.0 else None
        with self.autocast():
            z = generate(self.dit, cond, neg, shape, steps=steps, guidance=guidance, shift=shift, sampler=sampler,
                         seed=seed, clean_latents=clean, num_clean=num_clean, progress=progress, flow=self.flow)
        x = self.vae.decode(z.float(), normalized=True)  # [B, 3, T, H, W] in [-1, 1]
        settings = {"num_frames": num_frames, "height": height, "width": width, "latent_shape": list(shape[1:]),
                    "steps": steps, "guidance": guidance, "negative_prompt": negative_prompt, "sampler": sampler,
                    "shift": float(shift), "num_clean_latent_frames": num_clean}
        return SampleOutput(x, z, settings)
