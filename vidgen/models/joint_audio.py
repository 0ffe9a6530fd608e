"""The DiT's optional audio stream: audio latent tokens beside the video tokens, on a common clock.

    v, v_audio = DiT(audio_channels=Ca, audio_per_latent_frame=a, ...)(z, t, context, audio=audio, t_audio=t_audio)
      z [B, C, T, H, W], t [B] | [B, T]; audio [B, Ca, Ta] with Ta = T * a; t_audio [B] | [B, Ta] (None: t)
      v [B, C_out, T, H, W], v_audio [B, Ca, Ta]

One joint sequence: the audio latents become Ta tokens (a linear embedding + a learned modality embedding) after the
video tokens; every block's self-attention sees both and both cross-attend to the text; its own output head (final
norm + adaLN + zero-initialised linear) reads the audio velocity back. Each audio token is modulated by its own
t_audio, each video token by its latent frame's t, so one model does text-to-audio+video (both noisy), video-to-audio
(video t = 0) and audio-to-video (t_audio = 0).

Common clock (the temporal RoPE axis counts video latent frames). The causal video VAE (time stride s) maps 1 + s*k
frames to 1 + k latent frames: latent i >= 1 sees frames s(i-1)+1 .. s*i, latent 0 sees frame 0 alone, which is the
same s-frame window (s(i-1), s*i] for i = 0 with its s - 1 frames before frame 0 padded. Stamping each latent with
the last frame of its window, s*i, makes video position i = (last frame) / s, one uniform clock for every latent,
latent 0 included (a start or centre stamp would put latent 0, frame 0 alone, off the clock). Audio latents are
stamped the same way, by the end of their span: a of them tile each window, audio latent j = a*i + m (0 <= m < a)
spans the (m+1)-th a-th of window i and ends at frame s*(i - 1) + (m + 1)*s/a, so its position is

    p(j) = (j + 1) / a - 1        (`audio_positions`; independent of s)

Audio latent a*i + a - 1 ends with frame s*i: it sits at position i exactly, with video latent i; the others of that
window at i - 1 + 1/a, ..., i - 1/a. Example s = 2, a = 8 (4 audio latents per video frame): p(7) = 0 (ends with
frame 0, video latent 0), p(15) = 1 (ends with frame 2, latent 1), p(3) = -1/2 (ends with frame -1, a padded one),
p(0) = -7/8. A temporal patch pt > 1 stamps video token k with latent pt*k + pt - 1, so audio goes to (p - pt + 1)/pt.

Length (`audio_latents`): Ta = T * a. Latent 0 counts as a full window: the audio starts s - 1 frames before frame 0
(the frames the causal VAE pads: the source's audio before the clip, or silence where there is none) and ends with
the last frame, T*s/fps seconds for a clip of 1 + s(T-1) frames. Decoded audio minus its first (s-1)/fps seconds is
the clip's own sound. On this clock a window of latent frames is a whole block of audio latents (streams, chunks and
`frame_offset` windows align) and Ta is an integer for every s and a.

Spatial RoPE axes: an audio token has no place in the frame; it sits at the frame's centre ((h-1)/2, (w-1)/2). Among
audio tokens the spatial angles cancel (audio attends to audio by time alone); towards a video token the spatial
angle is that token's offset from the centre, symmetric left/right and up/down, whatever the resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from vidgen.models.causal_attention import block_causal_mask
from vidgen.models.layers import FP32LayerNorm, angle_dtype, modulate


def audio_latents(frames: int, per_latent_frame: int) -> int:
    """Ta: the number of audio latents that go with `frames` (T) video latent frames, T * a (see the module doc)."""
    return frames * per_latent_frame


def audio_positions(num_audio: int, per_latent_frame: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | None = None) -> torch.Tensor:
    """p(j) = (j + 1) / a - 1 `[Ta]`: each audio latent's time in video latent frames (end of its span, as video
    latent i <-> position i <-> frame s*i; module doc). The one place the common clock is written."""
    return (torch.arange(num_audio, dtype=dtype, device=device) + 1) / per_latent_frame - 1


def audio_times(t: torch.Tensor, t_audio: torch.Tensor | None, batch: int, num_audio: int,
                device: torch.device) -> torch.Tensor:
    """The audio tokens' flow times `[B, 1]` (one per sample) or `[B, Ta]` (one per audio latent), from t_audio
    `[B]` | `[B, Ta]`, or None: the video's t when that is per sample (`[B]`)."""
    if t_audio is None:
        if torch.as_tensor(t).ndim > 1:
            raise ValueError("t is per latent frame ([B, T]): pass t_audio ([B] or [B, Ta]) for the audio tokens")
        t_audio = t
    t_audio = torch.as_tensor(t_audio, dtype=torch.float32, device=device)
    if t_audio.ndim == 0:
        t_audio = t_audio.expand(batch)
    if t_audio.ndim == 1 and t_audio.shape[0] in (1, batch):
        return rearrange(t_audio.expand(batch), "b -> b 1")
    if t_audio.shape != (batch, num_audio):
        raise ValueError(f"t_audio must be [B] = [{batch}] or [B, Ta] = [{batch}, {num_audio}], "
                         f"got {list(t_audio.shape)}")
    return t_audio


@dataclass(frozen=True)
class JointModulation:
    """adaLN rows of a joint sequence `[B, Nv + Ta, D]`: `video` `[B, F, K, D]` for the first `num_video` tokens (one
    row set per latent frame, as `modulate` groups them), `audio` `[B, Ta | 1, K, D]` for the audio tokens after."""

    video: torch.Tensor
    audio: torch.Tensor
    num_video: int

    def plus(self, offset: torch.Tensor) -> JointModulation:
        """Both streams with a block's learned `offset` `[1, 1, K, D]` added (its `scale_shift_table`)."""
        return JointModulation(offset + self.video, offset + self.audio, self.num_video)

    def apply(self, op: Callable[..., torch.Tensor], x: torch.Tensor, *rows: int) -> torch.Tensor:
        """`op(tokens, *rows)` (`modulate` / `gate`) on the video and the audio tokens of x `[B, N, D]`, each with its
        own rows: `[B, N, D]`."""
        n = self.num_video
        return torch.cat([op(x[:, :n], *(self.video[:, :, r] for r in rows)),
                          op(x[:, n:], *(self.audio[:, :, r] for r in rows))], dim=1)


def joint_block_causal_mask(num_chunks: int, video_per_chunk: int, audio_per_chunk: int,
                            window_chunks: int | None, sink_chunks: int,
                            device: torch.device | None = None) -> torch.Tensor:
    """`block_causal_mask` `[N, N]` (True = attend) over the video tokens, then the audio tokens (each chunk-major):
    an audio token belongs to the chunk of the latent frame whose window it tiles (`chunk_visible`'s rule)."""
    visible = block_causal_mask(num_chunks, 1, window_chunks, sink_chunks, device)  # [chunks, chunks]
    chunk = torch.arange(num_chunks, device=device)
    ids = torch.cat([chunk.repeat_interleave(video_per_chunk), chunk.repeat_interleave(audio_per_chunk)])  # [N]
    return visible[ids][:, ids]


class AudioStream(nn.Module):
    """The DiT's audio tokens: audio latents `[B, Ca, Ta] -> [B, Ta, D]` in (`embed`), `[B, Ta, D] -> [B, Ca, Ta]`
    velocities out (`head`), and their RoPE positions on the video's clock (`rope_positions`)."""

    def __init__(self, channels: int, dim: int, per_latent_frame: int, eps: float = 1e-6):
        super().__init__()
        self.channels, self.per_latent_frame = channels, per_latent_frame
        self.embedding = nn.Linear(channels, dim)
        self.modality = nn.Parameter(torch.empty(1, 1, dim))  # "this token is audio", added to every audio token
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.empty(1, 2, dim))  # the audio head's own adaLN offsets
        self.proj_out = nn.Linear(dim, channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier embedding, N(0, 0.02) modality embedding, head as the video's: v_audio = 0 at init."""
        nn.init.xavier_uniform_(self.embedding.weight)
        nn.init.zeros_(self.embedding.bias)
        nn.init.normal_(self.modality, std=0.02)
        self.scale_shift_table.copy_(torch.randn_like(self.scale_shift_table) / self.scale_shift_table.shape[-1]**0.5)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def check(self, audio: torch.Tensor, batch: int, frames: int) -> None:
        """Refuse audio that is not `[B, Ca, T * a]` for a batch of `frames` (T) latent frames."""
        if audio.ndim != 3 or audio.shape[0] != batch:
            raise ValueError(f"audio must be [B, Ca, Ta] with B = {batch}, got {list(audio.shape)}")
        if audio.shape[1] != self.channels:
            raise ValueError(f"audio has {audio.shape[1]} channels, the DiT's audio_channels={self.channels}")
        expected = audio_latents(frames, self.per_latent_frame)
        if audio.shape[2] != expected:
            raise ValueError(f"audio has Ta={audio.shape[2]} latents; {frames} latent frames need Ta = T * "
                             f"audio_per_latent_frame = {frames} * {self.per_latent_frame} = {expected} (the first "
                             f"latent frame counts in full: vidgen.models.joint_audio)")

    def embed(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio latents `[B, Ca, Ta]` -> tokens `[B, Ta, D]`."""
        x = self.embedding(rearrange(audio, "b c n -> b n c"))  # one token per audio latent
        return x + self.modality.to(x.dtype)

    def head(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Velocity `[B, Ca, Ta]` of audio tokens x `[B, Ta, D]` with time embeddings temb `[B, Ta | 1, D]`."""
        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None]).unbind(dim=2)  # [B, Ta | 1, D] each
        x = modulate(self.norm_out(x.float()), shift, scale).type_as(x)
        return rearrange(self.proj_out(x), "b n c -> b c n")

    def rope_positions(self, num_audio: int, height: int, width: int, patch_t: int, offset: int,
                       device: torch.device | None = None) -> torch.Tensor:
        """(t, h, w) RoPE positions `[Ta, 3]` of the audio tokens beside a video token grid of height x width whose
        token frame k (temporal patch `patch_t`, stamped by its last latent frame) sits at k + offset."""
        dtype = angle_dtype(device)
        p = audio_positions(num_audio, self.per_latent_frame, dtype, device)  # [Ta], in latent frames
        time = (p - (patch_t - 1)) / patch_t + offset  # in token frames
        centre = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=dtype, device=device)
        return torch.cat([time[:, None], centre.expand(num_audio, 2)], dim=1)
