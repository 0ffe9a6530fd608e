"""Checkpoint -> sampled video: `DiTPipeline.from_pretrained(path)(prompts, num_frames, height, width, ...)`.

`from_pretrained` reads any DiT checkpoint or export folder through the one reader (`vidgen.io.checkpoint`), so
the DiT, the conditioner (its entries and encoders), the flow settings and the fingerprint-checked VAE are
rebuilt from what the checkpoint records. Calling the pipeline runs `vidgen.diffusion.sampling.generate` over
the same `Denoiser` that training optimises and decodes with the VAE. A joint audio + video checkpoint (a DiT with an
audio stream, trained with `task.module.audio_vae_path`) also loads its audio VAE and samples sound with the video
(text-to-audio+video; with `video=` and no `video_frames`, video-to-audio): `SampleOutput.audio` holds the clip's
own sound, the decoded audio less the (s - 1) frames before frame 0 that the common clock adds
(`vidgen.models.joint_audio`). `sample.py`, the sample-logging callback
and the evaluation scripts all use it; it depends only on models, diffusion, conditioning, io and data.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from vidgen.errors import UserError
from vidgen.conditioning import Conditioner
from vidgen.data.buckets import Bucket, to_bucket
from vidgen.diffusion.denoiser import Denoiser
from vidgen.diffusion.flow import RectifiedFlow, num_latent_tokens
from vidgen.diffusion.guidance import ClassifierFreeGuidance
from vidgen.diffusion.sampling import SAMPLERS, generate
from vidgen.diffusion.streaming import PromptSegment, stream_chunks
from vidgen.io.checkpoint import check_vae_reference, read_parts
from vidgen.io.lora import ADAPTER, merged
from vidgen.io.pretrained import load_pretrained
from vidgen.models.audio_vae import AudioVAE
from vidgen.models.vae import VideoVAE


def sound_on_clock(wave: torch.Tensor, latent_frames: int, per_latent_frame: int, hop: int,
                   time_stride: int) -> torch.Tensor:
    """A clip's own sound `[B, C, S]` (its 1 + s(T - 1) frames) -> `[B, C, T * a * hop]` on the joint DiT's clock
    (`vidgen.models.joint_audio`): (s - 1) frames of silence first, the span the causal video VAE pads before frame 0.
    ValueError when S is not that many frames' worth (a * hop / s samples per frame, to within one sample)."""
    s, a = time_stride, per_latent_frame
    frames, needed = 1 + s * (latent_frames - 1), latent_frames * a * hop
    expected = frames * a * hop / s
    if abs(wave.shape[-1] - expected) > 1:
        raise ValueError(f"{wave.shape[-1]} audio samples for {frames} frames, expected {expected:g} "
                         f"({a * hop / s:g} per frame: {a} audio latents of hop {hop} per {s} frames)")
    return torch.nn.functional.pad(wave, (needed - wave.shape[-1], 0))


class SamplingError(UserError):
    """A setting or input that cannot be sampled from; the message names it and what was expected."""


@dataclass
class SampleOutput:
    """Generated videos `[B, 3, T, H, W]` in [-1, 1], their latents `[B, C, t, h, w]` and the settings used; a joint
    checkpoint adds their sound `audio` `[B, C_audio, S]` in [-1, 1] at `audio_rate` Hz (S samples = T frames at
    `settings["fps"]`) and its latents `audio_latents` `[B, Ca, Ta]`."""

    video: torch.Tensor
    latents: torch.Tensor
    settings: dict[str, Any]
    audio: torch.Tensor | None = None
    audio_rate: int | None = None
    audio_latents: torch.Tensor | None = None


class DiTPipeline:
    """DiT + conditioner + flow + VAE: `pipe(prompts, num_frames, height, width, ...) -> SampleOutput`."""

    def __init__(self, dit: nn.Module, conditioner: Conditioner, vae: VideoVAE, flow: RectifiedFlow,
                 info: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None,
                 audio_vae: AudioVAE | None = None):
        self.denoiser = Denoiser(dit, flow)
        self.dit, self.conditioner, self.vae, self.flow = dit, conditioner, vae, flow
        self.audio_vae = audio_vae if getattr(dit, "audio_stream", None) is not None else None
        self.info = dict(info or {})
        self.defaults = dict(defaults or {})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, ema: bool = True, device: str | torch.device = "auto",
                        vae: str | os.PathLike | None = None,
                        audio_vae: str | os.PathLike | None = None) -> DiTPipeline:
        """Load a DiT checkpoint (file, FSDP, DeepSpeed) or export folder; `vae` / `audio_vae` override the recorded
        VAE / audio VAE folders (each checked against its recorded fingerprint)."""
        parts = read_parts(path, ema=ema, kind="dit")
        if ADAPTER in parts.adapters:  # a LoRA run or export: sample the base with the adapters folded in
            parts = merged(parts)
        vae_folder = check_vae_reference(parts.meta.get("vae") or {}, vae)
        audio_ref = parts.meta.get("audio_vae")
        sound = None
        if audio_ref or audio_vae is not None:
            sound = load_pretrained(check_vae_reference(audio_ref or {}, audio_vae, setting="audio_vae"), AudioVAE)
        pipe = cls(parts.build("dit"), parts.conditioner(), load_pretrained(vae_folder, VideoVAE),
                   RectifiedFlow(**parts.meta.get("flow", {})), parts.info, parts.meta.get("defaults"), sound)
        return pipe.to(device)

    def to(self, device: str | torch.device = "auto") -> DiTPipeline:
        """Move every part to `device` ("auto": CUDA when available) in eval mode."""
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        for m in (self.dit, self.conditioner, self.vae, self.audio_vae):
            if m is not None:
                m.to(device).eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast for the DiT and encoders on CUDA (the VAE decodes in fp32); no-op on CPU."""
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
        """Prompts -> the conditioner's keyword tensors on the pipeline's device."""
        with torch.no_grad(), self.autocast():
            cond = self.conditioner({"caption": list(prompts)})
        return {k: v.float() if torch.is_floating_point(v) else v for k, v in cond.items()}

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
        if video_frames is None:  # default: hold as much of the clip as the window allows, leave 1 latent frame
            usable = self.vae.latent_frames(1 + (video.shape[0] - 1) // self.vae.temporal_factor
                                            * self.vae.temporal_factor)
            video_frames = self.vae.pixel_frames(max(1, min(usable, total - 1)))
        try:
            k = self.vae.latent_frames(video_frames)
        except ValueError as e:
            raise SamplingError(f"video_frames={video_frames}: {e}") from None
        if k >= total or video.shape[0] < video_frames:
            raise SamplingError(f"video_frames={video_frames}: needs fewer than num_frames={num_frames} frames and "
                                f"at most the {video.shape[0]} frames of the given video")
        # Causal VAE: the latents of the first 1 + 4(k-1) frames are the first k latent frames of the whole clip.
        return self.encode_frames(video[:video_frames], height, width), k

    def fit_note(self, media: np.ndarray | None, num_clean: int, height: int, width: int) -> dict[str, Any]:
        """What happened to a conditioning image / clip: its size, the frames held, resize + centre crop."""
        if media is None:
            return {}
        media = np.asarray(media)
        src_h, src_w = media.shape[-3:-1]
        scale = max(height / src_h, width / src_w)  # cover the target, then crop the overflow (to_bucket)
        return {"conditioning": {"source_frames": int(media.shape[0]) if media.ndim == 4 else 1,
                                 "source_size": [int(src_h), int(src_w)],
                                 "held_frames": self.vae.pixel_frames(num_clean) if num_clean else 0,
                                 "resized_to": [round(src_h * scale), round(src_w * scale)],
                                 "centre_crop_to": [height, width]}}

    # ------------------------------------------------------------------ sound (joint checkpoints)
    @property
    def joint(self) -> bool:
        """Whether this pipeline samples sound with the video (a DiT with an audio stream + its audio VAE)."""
        return self.audio_vae is not None

    @property
    def fps(self) -> float | None:
        """Frame rate of a joint checkpoint's common clock: a audio latents span s frames, so fps = rate * s /
        (hop * a); None without sound."""
        if not self.joint:
            return None
        a = self.dit.audio_stream.per_latent_frame
        return self.audio_vae.sample_rate * self.vae.temporal_factor / (self.audio_vae.hop * a)

    def decode_audio(self, a: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Audio latents `[B, Ca, Ta]` -> the clip's own sound `[B, C, S]`: decoded, then its first (s - 1) frames'
        worth (before frame 0, `vidgen.models.joint_audio`) dropped; S = num_frames frames at `fps`."""
        wave = self.audio_vae.decode(a.float(), normalized=True)  # [B, C, Ta * hop]
        own = round(num_frames * self.audio_vae.sample_rate / self.fps)
        return wave[..., wave.shape[-1] - own:]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], num_frames: int, height: int, width: int, steps: int = 50,
                 guidance: float = 5.0, negative_prompt: str = "", seed: int | Sequence[int] = 0,
                 sampler: str = "euler", shift: float | None = None, image: np.ndarray | None = None,
                 video: np.ndarray | None = None, video_frames: int | None = None, strength: float | None = None,
                 step_cache: float | None = None, progress: bool = False,
                 audio: torch.Tensor | None = None) -> SampleOutput:
        """Generate one video per prompt; `seed` int (prompt i uses seed + i) or one per prompt.

        Joint checkpoint: sound is sampled with the video; `video` without `video_frames` is video-to-audio (the clip's
        first `num_frames` frames held, only the sound generated); `audio` `[C, S]` at the audio VAE's rate, the
        sound of `num_frames` frames at `fps`, is audio-to-video (the sound held, the video generated).

        With `video`: extension (its first `video_frames` held clean), or with `strength` a remix: the clip's first
        `num_frames` frames noised to t = strength and denoised under the prompt (1: text-to-video, 0: the clip).
        `step_cache`: a TeaCache threshold (`vidgen.diffusion.step_cache`; None: off).
        """
        if sampler not in SAMPLERS:
            raise SamplingError(f"sampler={sampler}: expected one of {sorted(SAMPLERS)}")
        if steps < 1:
            raise SamplingError(f"steps={steps}: expected at least 1")
        if step_cache is not None and not (isinstance(step_cache, (int, float)) and step_cache >= 0):
            raise SamplingError(f"step_cache={step_cache}: expected a threshold >= 0 (e.g. 0.1) or null (off)")
        try:
            guider = ClassifierFreeGuidance(guidance) if guidance != 1.0 else None
        except ValueError as e:
            raise SamplingError(str(e)) from None
        t, h, w = self.latent_size(num_frames, height, width)
        shape = (len(prompts), self.dit.in_channels, t, h, w)
        if shift is None:  # the resolution-dependent shift the objective trained with (SD3 Sec. 5.3.2)
            shift = self.flow.shift_for(num_latent_tokens(shape, self.dit.patch_size))
        start = None
        if strength is not None:
            if video is None:
                raise SamplingError(f"strength={strength}: a remix needs video=CLIP")
            if not 0.0 <= strength <= 1.0:
                raise SamplingError(f"strength={strength}: expected a value in [0, 1] (0 = the clip, 1 = new video)")
            if video.shape[0] < num_frames:
                raise SamplingError(f"num_frames={num_frames}: the clip to remix has only {video.shape[0]} frames")
            start, video = self.encode_frames(video[:num_frames], height, width), None
        audio_shape = None
        if self.joint:
            if start is not None or step_cache is not None:
                raise SamplingError("strength (remix) and step_cache: not with a joint audio + video checkpoint "
                                    "(it samples sound with the video)")
            audio_shape = (len(prompts), self.dit.audio_stream.channels, t * self.dit.audio_stream.per_latent_frame)
        audio_clean = None
        if audio is not None:
            if audio_shape is None:
                raise SamplingError("audio=: audio-to-video needs a joint audio + video checkpoint")
            try:
                wave = sound_on_clock(torch.as_tensor(audio, dtype=torch.float32)[None].to(self.device), t,
                                      audio_shape[2] // t, self.audio_vae.hop, self.vae.temporal_factor)
            except ValueError as e:
                raise SamplingError(f"audio: {e} (num_frames={num_frames} at {self.fps:g} fps, "
                                    f"{self.audio_vae.sample_rate} Hz)") from None
            audio_clean = self.audio_vae.encode(wave, normalize=True).mode()  # [1, Ca, Ta]
        if audio_shape is not None and video is not None and video_frames is None:
            # video-to-audio: the whole window is the given clip, held clean; only the sound is generated
            if video.shape[0] < num_frames:
                raise SamplingError(f"num_frames={num_frames}: video-to-audio needs that many frames, the clip has "
                                    f"{video.shape[0]}")
            z_clean, num_clean = self.encode_frames(video[:num_frames], height, width), t
        else:
            z_clean, num_clean = self.clean_latents(image, video, video_frames, num_frames, height, width)
        clean = mask = None
        if num_clean:
            clean = torch.zeros(1, *shape[1:], device=self.device)
            clean[:, :, :num_clean] = z_clean[:, :, :num_clean]
            mask = (torch.arange(t, device=self.device) < num_clean)[None]  # [1, T]
        cond = self.encode_prompts(prompts)
        uncond = self.encode_prompts([negative_prompt]) if guider is not None else None
        joint = {} if audio_shape is None else {"audio_shape": audio_shape, "audio_clean": audio_clean}
        with self.autocast():
            z = generate(self.denoiser, cond, shape, steps=steps, guider=guider, uncond=uncond, shift=shift,
                         sampler=sampler, seed=seed, clean=clean, clean_mask=mask, progress=progress, start=start,
                         strength=1.0 if strength is None else strength, step_cache=step_cache, **joint)
        z, a = z if audio_shape is not None else (z, None)
        x = self.vae.decode(z.float(), normalized=True)  # [B, 3, T, H, W] in [-1, 1]
        settings = {"num_frames": num_frames, "height": height, "width": width, "latent_shape": list(shape[1:]),
                    **self.fit_note(image if image is not None else video, num_clean, height, width),
                    "steps": steps, "guidance": guidance, "negative_prompt": negative_prompt, "sampler": sampler,
                    "shift": float(shift), "step_cache": step_cache, "num_clean_latent_frames": num_clean,
                    **({"remix_strength": strength} if strength is not None else {})}
        if a is None:
            return SampleOutput(x, z, settings)
        settings.update(fps=self.fps, audio_rate=self.audio_vae.sample_rate, audio_latent_shape=list(audio_shape[1:]),
                        task="video_to_audio" if num_clean == t else "audio_to_video" if audio is not None
                        else "text_to_audio_video")
        return SampleOutput(x, z, settings, self.decode_audio(a, num_frames), self.audio_vae.sample_rate, a)

    # ------------------------------------------------------------------ streaming (causal DiT)
    def latent_frame_of(self, pixel_frame: int) -> int:
        """The latent frame that holds pixel frame `pixel_frame` (causal VAE: frame 0 alone, then groups of 4)."""
        return -(-pixel_frame // self.vae.temporal_factor)

    @torch.no_grad()
    def stream(self, prompts: Sequence[tuple[float, str]], seconds: float, fps: float, height: int, width: int,
               steps: int = 25, guidance: float = 5.0, negative_prompt: str = "", seed: int = 0,
               sampler: str = "euler", shift: float | None = None, video: np.ndarray | None = None,
               video_frames: int | None = None) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """Stream `seconds` of video at `fps` with a causal DiT: yields (frames `[1, 3, f, H, W]` in [-1, 1], info)
        chunk by chunk, decoded through the VAE's causal cache, so nothing grows with length.

        prompts: `[(at_seconds, prompt), ...]`, the first at 0; at a later `at` the text switches with the KV cache
        re-filled (`vidgen.diffusion.streaming`). video: a clip to extend (its first `video_frames` frames, whole
        chunks of latents, are the stream's start; `seconds` counts from the clip's start). info: {"chunk",
        "frames" so far, "prompt"}.
        """
        if not getattr(self.dit, "causal", False):
            raise SamplingError("mode=stream: this checkpoint's DiT has attention=full (bidirectional over one "
                                "window); streaming needs a causal DiT (e.g. experiment=quickstart_stream)")
        if sampler not in SAMPLERS:
            raise SamplingError(f"sampler={sampler}: expected one of {sorted(SAMPLERS)}")
        prompts = sorted(((float(at), str(p)) for at, p in prompts), key=lambda a: a[0])
        if not prompts or prompts[0][0] != 0.0:
            raise SamplingError("prompts: the schedule must start with a prompt at 0 s")
        if not seconds > 0 or not fps > 0:
            raise SamplingError(f"seconds={seconds}, fps={fps}: both must be positive")
        cf = self.dit.chunk_frames
        _, h, w = self.latent_size(1, height, width)
        total = max(1, round(seconds * fps))  # pixel frames
        num_chunks = -(-(self.latent_frame_of(total - 1) + 1) // cf)
        context = None
        if video is not None:
            frames = video_frames or 1 + (video.shape[0] - 1) // self.vae.temporal_factor * self.vae.temporal_factor
            try:
                lat = self.vae.latent_frames(frames)
            except ValueError as e:
                raise SamplingError(f"video_frames={frames}: {e}") from None
            lat -= lat % cf
            if lat < 1 or video.shape[0] < frames:
                raise SamplingError(f"video_frames={frames}: needs at least one chunk ({cf} latent frames) and at "
                                    f"most the {video.shape[0]} frames of the given video")
            context = self.encode_frames(video[:self.vae.pixel_frames(lat)], height, width)
        try:
            guider = ClassifierFreeGuidance(guidance) if guidance != 1.0 else None
        except ValueError as e:
            raise SamplingError(str(e)) from None
        uncond = self.encode_prompts([negative_prompt]) if guider is not None else None
        segments = [PromptSegment(self.latent_frame_of(round(at * fps)) // cf, self.encode_prompts([p]), uncond)
                    for at, p in prompts]
        starts = [seg.start_chunk for seg in segments]
        shape = (1, self.dit.in_channels, cf, h, w)
        if shift is None:  # as trained: the resolution shift of a clip of window_chunks chunks
            shift = self.flow.shift_for(num_latent_tokens(shape, self.dit.patch_size) * (self.dit.window_chunks or 1))
        n0 = 0 if context is None else context.shape[2] // cf

        def latents() -> Iterator[torch.Tensor]:
            if context is not None:
                yield from context.split(cf, dim=2)
            with self.autocast():
                for _, z in stream_chunks(self.denoiser, segments, num_chunks - n0, shape, steps=steps, guider=guider,
                                          shift=shift, sampler=sampler, seed=seed, context=context):
                    yield z.float()

        done = 0
        for chunk, x in enumerate(self.vae.decode_stream(latents(), normalized=True)):
            x = x[:, :, : total - done]
            done += x.shape[2]
            prompt = prompts[max(i for i, s in enumerate(starts) if s <= chunk or i == 0)][1]
            yield x, {"chunk": chunk, "frames": done, "prompt": prompt, "context": chunk < n0, "shift": float(shift)}
            if done >= total:
                return

