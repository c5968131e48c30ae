#!/usr/bin/env bash
# Issue 20's offline chain: guide a model guidelab did not train. A diffusers UNet2DModel is trained unconditionally on
# the demo digits, exported with save_pretrained (sidecar removed, so nothing guidelab-specific is left), loaded back
# as an off-the-shelf model (ckpt=diffusers:DIR), and steered by a noisy classifier trained on its own schedule, read
# by the two demo judges (a ResNet and a VGG, neither of the classifier's family). Table: $OUT/cg/results.md.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${CHAIN_DIR:-outputs/pretrained_chain}
t() { local s=$(date +%s); "$@"; echo "[$(( $(date +%s) - s )) s] ${*:1:4}" >&2; }
start=$(date +%s)
t $PY train_diffusion.py experiment=demo model=diffusers16 model.conditional=false model.p_uncond=0 \
  hydra.run.dir="$OUT/diffusion"
t $PY export_diffusers.py "$OUT/diffusion/checkpoints/last.pt" "$OUT/export"
rm "$OUT/export/guidelab.json"
t $PY train_classifier.py experiment=demo train.steps=1200 diffusion=pretrained diffusion.model="diffusers:$OUT/export" \
  hydra.run.dir="$OUT/classifier"
t $PY train_classifier.py experiment=demo classifier=evaluator hydra.run.dir="$OUT/evaluator"
t $PY train_classifier.py experiment=demo classifier=evaluator_vgg seed=1 hydra.run.dir="$OUT/evaluator_vgg"
t $PY sample.py -m experiment=demo ckpt="diffusers:$OUT/export" guidance=cg scale=0,3,10,20 \
  classifier_ckpt="$OUT/classifier/checkpoints/last.pt" evaluator_ckpt="$OUT/evaluator/checkpoints/last.pt" \
  second_evaluator_ckpt="$OUT/evaluator_vgg/checkpoints/last.pt" hydra.sweep.dir="$OUT/cg"
echo "chain finished in $(( $(date +%s) - start )) s; table: $OUT/cg/results.md"
