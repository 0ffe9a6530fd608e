#!/usr/bin/env bash
# Streaming at toy scale on CPU: the demo DiT fine-tuned into a causal one, then a one-minute video with the prompt
# switching from the rabbit to the man in the car at 30 s, written to the mp4 chunk by chunk as it is generated.
#   demo outputs (runs/demo_dit/export, the quickstart VAE) -> 17-frame latent shards of the demo clips
#   -> experiment=quickstart_stream (causal, Diffusion Forcing, ~4 min) -> export
#   -> sample.py mode=stream seconds=60 prompts=[{at: 0, ...}, {at: 30, ...}] -> docs/stream_demo.png
#   -> experiment=distill_stream_demo (a 4-step streaming student, DMD2 on its own rollouts, ~6 min)
#   -> the same minute from the student, no CFG -> docs/stream_student_demo.png
# Reuses the demo's outputs; runs scripts/demo.sh first without them. A stage whose output exists is skipped.
# Knobs (environment): PY, RUNS, DATA, SECONDS_LONG (60), SWITCH_AT (30), STREAM_STEPS (600), SHEET_OUT,
# STUDENT_STEPS (300; 0 skips the student), STUDENT_SHEET_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
DATA=${DATA:-data}
SECONDS_LONG=${SECONDS_LONG:-60}
SWITCH_AT=${SWITCH_AT:-30}
STREAM_STEPS=${STREAM_STEPS:-600}
SHEET_OUT=${SHEET_OUT:-docs/stream_demo.png}
STUDENT_STEPS=${STUDENT_STEPS:-300}
STUDENT_SHEET_OUT=${STUDENT_SHEET_OUT:-docs/stream_student_demo.png}
OUT=$RUNS/stream_demo
export PYTHONUNBUFFERED=1
start=$(date +%s)
RABBIT="A big, fluffy animated white rabbit stands in a green meadow under a bright blue sky, with trees and flowers around him, in a colourful cartoon style."
MAN="A man sits in the passenger seat of a moving car and talks on a mobile phone, while the landscape passes by the window behind him."

echo "== 1/5 the demo's DiT export and VAE"
if [ ! -f "$RUNS/demo_dit/export/vidgen.json" ] || [ ! -f "$RUNS/quickstart_vae/export/config.json" ]; then
  echo "   not found: running the demo first (bash scripts/demo.sh, ~20 min on CPU)"
  bash scripts/demo.sh
fi

echo "== 2/5 17-frame latent shards of the demo clips (9 latent frames: room for the window and the sink)"
if [ ! -f "$RUNS/quickstart_vae/latents_17/manifest.json" ]; then
  $PY data_prep/encode_latents.py --shards "$DATA/demo_shards" --vae "$RUNS/quickstart_vae/export" \
      --output "$RUNS/quickstart_vae/latents_17" --buckets 17x48x112 --target-fps 15 --batch-size 4 --num-workers 0 \
      --no-progress
fi

echo "== 3/5 fine-tune the demo DiT into a causal one (experiment=quickstart_stream, $STREAM_STEPS steps)"
if [ ! -f "$RUNS/quickstart_stream/checkpoints/last.ckpt" ]; then
  $PY train.py experiment=quickstart_stream paths.runs_dir="$RUNS" trainer.max_steps="$STREAM_STEPS"
fi
$PY -m vidgen.io.checkpoint "$RUNS/quickstart_stream/checkpoints/last.ckpt" "$RUNS/quickstart_stream/export"

echo "== 4/5 stream $SECONDS_LONG s at 15 fps, the prompt switching at $SWITCH_AT s (frames go to the mp4 as they come)"
rm -rf "$OUT"
$PY sample.py ckpt="$RUNS/quickstart_stream/export" mode=stream seconds="$SECONDS_LONG" fps=15 height=48 width=112 \
    steps=25 guidance=2.0 "prompts=[{at: 0, prompt: \"$RABBIT\"}, {at: $SWITCH_AT, prompt: \"$MAN\"}]" out_dir="$OUT"
mkdir -p "$(dirname "$SHEET_OUT")"
cp "$OUT"/*.png "$SHEET_OUT"
if [ "$STUDENT_STEPS" -gt 0 ]; then
  echo "== 5/5 a 4-step streaming student (experiment=distill_stream_demo, $STUDENT_STEPS steps), the same minute from it"
  if [ ! -f "$RUNS/distill_stream_demo/checkpoints/last.ckpt" ]; then
    $PY train.py experiment=distill_stream_demo paths.runs_dir="$RUNS" trainer.max_steps="$STUDENT_STEPS"
  fi
  $PY -m vidgen.io.checkpoint "$RUNS/distill_stream_demo/checkpoints/last.ckpt" "$RUNS/distill_stream_demo/export"
  rm -rf "$OUT"_student
  $PY sample.py ckpt="$RUNS/distill_stream_demo/export" mode=stream seconds="$SECONDS_LONG" fps=15 height=48 \
      width=112 "prompts=[{at: 0, prompt: \"$RABBIT\"}, {at: $SWITCH_AT, prompt: \"$MAN\"}]" out_dir="$OUT"_student
  cp "$OUT"_student/*.png "$STUDENT_SHEET_OUT"
fi

echo
echo "stream demo finished in $(( $(date +%s) - start )) s"
echo "  causal DiT export: $RUNS/quickstart_stream/export"
echo "  the stream:        $OUT/*.mp4 (+ .json settings and timings), one frame per second: $SHEET_OUT"
if [ "$STUDENT_STEPS" -gt 0 ]; then
  echo "  the student's:     ${OUT}_student/*.mp4 (4 steps per chunk, no CFG): $STUDENT_SHEET_OUT"
fi
