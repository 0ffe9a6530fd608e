#!/usr/bin/env bash
# Joint audio + video at toy scale on CPU: Big Buck Bunny's clips with their AAC soundtrack.
#   bigbuckbunny.mp4 -> clip shards that keep the sound (24 kHz mono FLAC beside each clip)
#   -> a causal spectrogram audio VAE + Griffin-Lim (experiment=quickstart_audio_vae) -> export
#   -> the demo DiT given an audio stream (experiment=audio_demo, init_from the demo DiT: video weights
#      kept, the audio stream new), trained on clips + sound with both VAEs in the loop -> export
#   -> sample.py: a clip with generated sound (mp4 with AAC + WAV), and new sound for a real clip (video-to-audio)
# Reuses the demo's outputs (runs/demo_dit/export, the quickstart VAE); runs scripts/demo.sh first without them.
# A stage whose output exists is skipped. Knobs: PY, RUNS, DATA, AUDIO_VAE_STEPS (1500), JOINT_STEPS (800), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
DATA=${DATA:-data}
AUDIO_VAE_STEPS=${AUDIO_VAE_STEPS:-1500}
JOINT_STEPS=${JOINT_STEPS:-800}
OUT=${OUT:-$RUNS/audio_demo_samples}
export PYTHONUNBUFFERED=1
start=$(date +%s)
RABBIT="A big, fluffy animated white rabbit stands in a green meadow under a bright blue sky, with trees and flowers around him, in a colourful cartoon style."

echo "== 1/5 the demo's DiT export and VAE"
if [ ! -f "$RUNS/demo_dit/export/vidgen.json" ] || [ ! -f "$RUNS/quickstart_vae/export/config.json" ]; then
  echo "   not found: running the demo first (bash scripts/demo.sh, ~20 min on CPU)"
  bash scripts/demo.sh
fi

echo "== 2/5 clip shards of bigbuckbunny.mp4 with its soundtrack (24 kHz mono)"
if [ ! -f "$DATA/audio_demo_shards/manifest.json" ]; then
  $PY data_prep/demo_data.py "$DATA/audio_demo_input" --clips bigbuckbunny.mp4 >/dev/null
  $PY data_prep/make_shards.py --input "$DATA/audio_demo_input" --output "$DATA/audio_demo_shards" --max-side 128 \
      --min-frames 17 --max-frames 49 --shard-size 4 --workers 2 --seed 0 --audio-rate 24000 --audio-channels 1
fi

echo "== 3/5 the audio VAE (experiment=quickstart_audio_vae, $AUDIO_VAE_STEPS steps)"
if [ ! -f "$RUNS/quickstart_audio_vae/checkpoints/last.ckpt" ]; then
  $PY train.py experiment=quickstart_audio_vae paths.runs_dir="$RUNS" data.train_shards="$DATA/audio_demo_shards" \
      data.val_shards=null data.val_split=null data.num_workers=0 data.resampled=true data.samples_per_epoch=800 \
      trainer.limit_val_batches=0 trainer.max_steps="$AUDIO_VAE_STEPS"
fi
$PY -m vidgen.io.checkpoint "$RUNS/quickstart_audio_vae/checkpoints/last.ckpt" "$RUNS/quickstart_audio_vae/export"
# Its latent mean/std over the clips' whole soundtracks (the joint DiT sees unit-variance audio latents).
$PY - "$RUNS/quickstart_audio_vae/export" "$DATA/audio_demo_shards" <<'PY'
import sys
from vidgen.data.datamodule import ClipDataModule
from vidgen.training.audio_vae_module import store_latent_stats
folder, shards = sys.argv[1:3]
dm = ClipDataModule(train_shards=shards, val_shards=shards, buckets=[[17, 48, 112]], batch_size=1, num_workers=0,
                    target_fps=15, log_stats=False, rank=0, world_size=1, audio=True, audio_rate=24000, audio_channels=1)
dm.setup("validate")
vae = store_latent_stats(folder, dm.val_dataloader(), clips=16)
print(f"audio latent stats stored in {folder}: mean {vae.latent_mean.abs().mean():.3f} (|.|), "
      f"std {vae.latent_std.mean():.3f} (mean over channels)")
PY

echo "== 4/5 the demo DiT with an audio stream (experiment=audio_demo, $JOINT_STEPS steps)"
if [ ! -f "$RUNS/audio_demo/checkpoints/last.ckpt" ]; then
  $PY train.py experiment=audio_demo paths.runs_dir="$RUNS" paths.data_dir="$DATA" \
      trainer.max_steps="$JOINT_STEPS"
fi
$PY -m vidgen.io.checkpoint "$RUNS/audio_demo/checkpoints/last.ckpt" "$RUNS/audio_demo/export"

echo "== 5/5 sample: text to video + sound, and new sound for a real clip (video-to-audio)"
rm -rf "$OUT"
$PY sample.py ckpt="$RUNS/audio_demo/export" "prompt=\"$RABBIT\"" num_frames=33 height=48 width=112 \
    steps=25 guidance=2.0 out_dir="$OUT/text_to_audio_video"
$PY sample.py ckpt="$RUNS/audio_demo/export" "prompt=\"$RABBIT\"" video="$DATA/audio_demo_input/bigbuckbunny.mp4" \
    num_frames=33 height=48 width=112 steps=25 guidance=2.0 out_dir="$OUT/video_to_audio"

# How the audio VAE gives back the soundtrack (beside the vocoder's ceiling), and every sound as a spectrogram.
$PY bench/audio_vae_recon.py --export "$RUNS/quickstart_audio_vae/export" --wav-dir "$OUT/audio_vae_recon"
$PY scripts/plot_audio.py "$OUT/spectrograms.png" "$DATA/audio_demo_input/bigbuckbunny.mp4" \
    "audio VAE reconstruction=$OUT/audio_vae_recon/audio_vae.wav" \
    "video-to-audio (the clip's first 2.2 s)=$(ls "$OUT"/video_to_audio/*.wav | head -1)" \
    "text-to-audio+video=$(ls "$OUT"/text_to_audio_video/*.wav | head -1)"

echo
echo "audio demo finished in $(( $(date +%s) - start )) s"
echo "  audio VAE export: $RUNS/quickstart_audio_vae/export"
echo "  joint DiT export: $RUNS/audio_demo/export"
echo "  with sound:       $OUT/*/*.mp4 (AAC) + .wav beside each"
echo "  spectrograms:     $OUT/spectrograms.png (real | audio VAE reconstruction | video-to-audio | text-to-audio+video)"
