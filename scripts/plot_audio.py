"""Spectrograms of sampled sound beside real sound: `python scripts/plot_audio.py OUT.png REAL.mp4 A.wav [B.wav ...]`.

Each input may be given as `LABEL=PATH` to title its panel (else the file's folder names it).
The first input (any media file with an audio track, or a WAV) is the reference; each WAV is one generated
soundtrack (sample.py writes one beside every mp4 of a joint audio + video checkpoint). Log-magnitude STFT
(1024-sample windows, hop 256), the same colour scale for all; the title of each gives its RMS level.
"""

from __future__ import annotations

import sys
import wave
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vidgen.data.audio import read_audio  # noqa: E402


def load(path: Path, rate: int) -> np.ndarray:
    """Mono float samples of a WAV (16-bit) or of any media file's audio track resampled to `rate`."""
    if path.suffix == ".wav":
        with wave.open(str(path)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
            return pcm.mean(axis=1) / 32767.0
    pcm = read_audio(path, rate, 1).pcm  # int16 [1, S]
    return pcm[0].astype(np.float32) / 32767.0


def labelled(arg: str) -> tuple[str | None, Path]:
    """`LABEL=PATH` -> (LABEL, PATH); a plain path (or one whose text holds '=' itself) -> (None, PATH)."""
    label, _, path = arg.partition("=")
    return (label, Path(path)) if path and not Path(arg).exists() else (None, Path(arg))


def spectrogram(x: np.ndarray, n: int = 1024, hop: int = 256) -> np.ndarray:
    frames = [x[i:i + n] * np.hanning(n) for i in range(0, max(1, len(x) - n + 1), hop)]
    return 20 * np.log10(np.abs(np.fft.rfft(np.stack(frames), axis=1)).T + 1e-5)


def main() -> None:
    out = Path(sys.argv[1])
    (ref_label, ref), *gens = (labelled(a) for a in sys.argv[2:])
    with wave.open(str(gens[0][1])) as w:
        rate = w.getframerate()
    signals = [(ref_label or "real: " + ref.name, load(ref, rate))] + [(label or g.parent.name, load(g, rate))
                                                                       for label, g in gens]
    fig, axes = plt.subplots(1, len(signals), figsize=(4 * len(signals), 3), squeeze=False)
    for ax, (name, x) in zip(axes[0], signals):
        ax.imshow(spectrogram(x), origin="lower", aspect="auto", vmin=-60, vmax=40, cmap="magma",
                  extent=[0, len(x) / rate, 0, rate / 2000])
        ax.set_title(f"{name}\nRMS {np.sqrt(np.mean(x ** 2)):.3f}", fontsize=9)
        ax.set_xlabel("s")
        ax.set_ylabel("kHz")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
