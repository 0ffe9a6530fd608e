#!/usr/bin/env bash
# Fine-tune the demo DiT on a niche style, at toy scale on CPU, and show before | after:
#   warm-graded copies of the demo clips (style set) + the demo DiT's own samples of the demo captions (prior set)
#   -> LoRA fine-tune (experiment=finetune_lora, rank 32, style:prior 1:1, trigger "sks", 800 steps) -> export
#   -> vidgen.eval.before_after: base | tuned, with and without "sks" -> docs/finetune_grid.png + the two numbers.
# Reuses the demo's outputs (runs/demo_dit/export, data/demo_shards); runs scripts/demo.sh first without them.
# A stage whose output exists is skipped (delete $DATA/finetune_* or $RUNS/finetune_demo to redo it).
# Knobs (environment): PY, RUNS, DATA, FT_STEPS (800), SAMPLE_STEPS (25), PRIOR_SEEDS, EVAL_SEEDS, GRID_OUT,
#   DIT_OVERRIDES (the base's model/dit + model/text sizes; default: experiment=demo_dit's).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs}
DATA=${DATA:-data}
FT_STEPS=${FT_STEPS:-800}
SAMPLE_STEPS=${SAMPLE_STEPS:-25}
PRIOR_SEEDS=${PRIOR_SEEDS:-100,101,102,103}   # not the evaluation seeds: prior_drift is measured on unseen noise
EVAL_SEEDS=${EVAL_SEEDS:-0,1}
GRID_OUT=${GRID_OUT:-docs/finetune_grid.png}
# experiment=demo_dit's model (configs/experiment/demo_dit.yaml): the LoRA base must be built the same
DIT_OVERRIDES=${DIT_OVERRIDES:-"model/dit=quickstart model.text.dim=64 model.text.depth=2 model.text.num_heads=2"}
SIZE="--num-frames 9 --height 48 --width 112 --steps $SAMPLE_STEPS --guidance 2.0"
BASE=$RUNS/demo_dit/export
STYLE=$DATA/finetune_style_shards
PRIOR=$DATA/finetune_prior_shards
TUNED=$RUNS/finetune_demo
export PYTHONUNBUFFERED=1
start=$(date +%s)

echo "== 1/6 the demo's DiT export and clip shards"
if [ ! -f "$BASE/vidgen.json" ] || [ ! -f "$DATA/demo_shards/manifest.json" ]; then
  echo "   not found: running the demo first (bash scripts/demo.sh, ~20 min on CPU)"
  bash scripts/demo.sh
fi

echo "== 2/6 style set: the demo clips with a warm colour grade (data_prep/style_shards.py)"
if [ ! -f "$STYLE/manifest.json" ]; then
  $PY data_prep/style_shards.py --input "$DATA/demo_shards" --output "$STYLE" --style warm
fi

echo "== 3/6 prior set: the base DiT's own samples of the demo captions (data_prep/prior_shards.py)"
if [ ! -f "$PRIOR/manifest.json" ]; then
  $PY data_prep/prior_shards.py --ckpt "$BASE" --prompts data_prep/demo_captions.jsonl --seeds "$PRIOR_SEEDS" \
      --output "$PRIOR" $SIZE --shard-size 4
fi

echo "== 4/6 LoRA fine-tune of the demo DiT (rank 32): style (trigger sks) : prior = 1 : 1, $FT_STEPS steps"
if [ ! -f "$TUNED/checkpoints/last.ckpt" ]; then
  # shellcheck disable=SC2086  # DIT_OVERRIDES is a list of overrides
  $PY train.py experiment=finetune_lora run_name=finetune_demo paths.runs_dir="$RUNS" data=demo trainer=cpu \
      num_threads=1 task.module.init_from="$BASE" $DIT_OVERRIDES \
      data.train_shards=null "data.sources=[{shards: $STYLE, weight: 1, trigger: sks}, {shards: $PRIOR, weight: 1}]" \
      "data.buckets=[[9,48,112]]" trainer.max_steps="$FT_STEPS" trainer.limit_val_batches=0 \
      task.module.sample_posterior=false task.module.flow.base_shift=1.0 task.module.flow.base_tokens=64 \
      task.module.optimizer.lr=1e-3 task.module.scheduler.warmup_steps=20 task.module.lora.rank=32 \
      task.module.lora.alpha=32
fi

echo "== 5/6 export the adapters (EMA weights)"
$PY -m vidgen.io.checkpoint "$TUNED/checkpoints/last.ckpt" "$TUNED/export"

echo "== 6/6 before | after: same prompts and seeds, with and without the trigger"
$PY -m vidgen.eval.before_after --base "$BASE" --tuned "$TUNED/export" --prompts data_prep/demo_captions.jsonl \
    --trigger sks --seeds "$EVAL_SEEDS" --style-shards "$STYLE" --out "$RUNS/finetune_before_after" $SIZE
mkdir -p "$(dirname "$GRID_OUT")"
cp "$RUNS/finetune_before_after/grid.png" "$GRID_OUT"

echo
echo "finetune demo finished in $(( $(date +%s) - start )) s"
echo "  style / prior shards: $STYLE  $PRIOR"
echo "  LoRA run + export:    $TUNED   ($TUNED/export)"
echo "  before | after:       $RUNS/finetune_before_after (settings.json, mp4s), grid copied to $GRID_OUT"
