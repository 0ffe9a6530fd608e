"""Audio reconstruction metrics on waveforms `[B, C, S]` (or `[B, S]`) in [-1, 1], one value per clip `[B]`.

Plain torch (no torchaudio): the STFT is `torch.stft` with a Hann window and the mel filterbank is built here
(HTK mel scale, triangular filters). All are differentiable, so the audio VAE's training losses reuse them.
"""

from __future__ import annotations

import functools

import torch


def _clips(x: torch.Tensor) -> torch.Tensor:
    """[B, C, S] or [B, S] -> [B, C, S] float32."""
    if x.ndim == 2:
        x = x[:, None]
    if x.ndim != 3:
        raise ValueError(f"audio metrics expect [B, C, S] or [B, S] waveforms, got {tuple(x.shape)}")
    return x.float()


def _check_pair(ref: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != rec.shape:
        raise ValueError(f"reference {tuple(ref.shape)} and reconstruction {tuple(rec.shape)} differ in shape")
    return _clips(ref), _clips(rec)


def snr_db(ref: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio 10 log10(sum ref^2 / sum (ref - rec)^2) per clip, [B] dB (inf when identical)."""
    ref, rec = _check_pair(ref, rec)
    signal = ref.pow(2).flatten(1).sum(dim=1)
    noise = (ref - rec).pow(2).flatten(1).sum(dim=1)
    return 10.0 * (torch.log10(signal) - torch.log10(noise))


def stft_magnitude(x: torch.Tensor, n_fft: int = 1024, hop: int | None = None) -> torch.Tensor:
    """|STFT| of x [B, C, S] -> [B, C, n_fft // 2 + 1, frames]; Hann window n_fft, centred frames, zero padding.

    The magnitude has a floor of 1e-5 (sqrt of a 1e-10 power floor) so logs and ratios stay finite on silence.
    """
    x = _clips(x)
    b, c, s = x.shape
    hop = hop or n_fft // 4
    window = torch.hann_window(n_fft, device=x.device, dtype=x.dtype)
    spec = torch.stft(x.reshape(b * c, s), n_fft, hop_length=hop, window=window, center=True, pad_mode="constant",
                      return_complex=True)  # [(B C), F, frames]
    power = spec.real.pow(2) + spec.imag.pow(2)
    return power.clamp_min(1e-10).sqrt().reshape(b, c, *spec.shape[-2:])


def spectral_convergence(mag_ref: torch.Tensor, mag_rec: torch.Tensor) -> torch.Tensor:
    """|| |S_ref| - |S_rec| ||_F / || |S_ref| ||_F per clip, [B] (Arik et al. 2019, Eq. 4); mags [B, C, F, T]."""
    num = (mag_ref - mag_rec).pow(2).flatten(1).sum(dim=1).sqrt()
    return num / mag_ref.pow(2).flatten(1).sum(dim=1).sqrt().clamp_min(1e-8)


def stft_spectral_convergence(ref: torch.Tensor, rec: torch.Tensor, n_fft: int = 1024,
                              hop: int | None = None) -> torch.Tensor:
    """Spectral convergence of the STFT magnitudes of two waveforms [B, C, S] per clip, [B] (0 when identical)."""
    ref, rec = _check_pair(ref, rec)
    return spectral_convergence(stft_magnitude(ref, n_fft, hop), stft_magnitude(rec, n_fft, hop))


def hz_to_mel(f: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: 2595 log10(1 + f / 700)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(f, dtype=torch.float64) / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    """Inverse of `hz_to_mel`."""
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def mel_filterbank(n_fft: int, n_mels: int, rate: int, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """Triangular mel filters [n_mels, n_fft // 2 + 1] (HTK scale, peak 1, no area normalisation), float32 on CPU.

    Filter m rises from mel point m to m + 1 and falls to m + 2, the n_mels + 2 points evenly spaced in mel
    between fmin and fmax (default rate / 2).
    """
    fmax = rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= rate / 2:
        raise ValueError(f"mel filterbank needs 0 <= fmin < fmax <= rate / 2, got fmin {fmin}, fmax {fmax}, rate {rate}")
    freqs = torch.linspace(0, rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(fmin)), float(hz_to_mel(fmax)), n_mels + 2, dtype=torch.float64))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [n_mels, 1] each
    rising = (freqs - lo) / (mid - lo)
    falling = (hi - freqs) / (hi - mid)
    return torch.minimum(rising, falling).clamp_min(0.0).float()


def log_mel(x: torch.Tensor, rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 80) -> torch.Tensor:
    """log10 mel magnitude spectrogram of x [B, C, S] -> [B, C, n_mels, frames] (floor 1e-5, as DAC's mel loss)."""
    mag = stft_magnitude(x, n_fft, hop)
    fb = mel_filterbank(n_fft, n_mels, int(rate)).to(mag.device)
    return torch.log10(torch.einsum("mf,bcft->bcmt", fb, mag).clamp_min(1e-5))  # mel bins from linear bins


def log_mel_l1(ref: torch.Tensor, rec: torch.Tensor, rate: int, n_fft: int = 1024, hop: int = 256,
               n_mels: int = 80) -> torch.Tensor:
    """Mean |log10 mel(ref) - log10 mel(rec)| per clip, [B] (0 when identical); `rate` in Hz."""
    ref, rec = _check_pair(ref, rec)
    diff = log_mel(ref, rate, n_fft, hop, n_mels) - log_mel(rec, rate, n_fft, hop, n_mels)
    return diff.abs().flatten(1).mean(dim=1)
