#!/usr/bin/env bash
# The offline chain: guide a model guidelab did not train. A diffusers UNet2DModel is trained unconditionally on
# the demo digits, exported with save_pretrained (sidecar removed, so nothing guidelab-specific is left), loaded back
# as an off-the-shelf model (ckpt=diffusers:DIR), and steered by a noisy classifier trained on its own schedule, read
# by the demo's judges (a ResNet and a VGG, neither of the classifier's family, the same commands as `make demo`).
# Table: $OUT/cg/results.md. Re-running skips the finished steps (a run dir with checkpoints/last.pt).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${CHAIN_DIR:-outputs/pretrained_chain}
mkdir -p "$OUT"
step() {  # step NAME CMD...: run CMD unless $OUT/NAME holds a finished run; its wall time goes to $OUT/timings.txt
  local name=$1; shift
  if [ -f "$OUT/$name/checkpoints/last.pt" ] || [ -f "$OUT/$name/results.csv" ] || [ -f "$OUT/$name/model_index.json" ]; then
    echo "reusing $OUT/$name"; return
  fi
  local t0; t0=$(date +%s)
  "$@"
  echo "$name: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/timings.txt"
}
step diffusion $PY train_diffusion.py experiment=demo model=diffusers16 model.conditional=false model.p_uncond=0 \
  hydra.run.dir="$OUT/diffusion"
if [ ! -f "$OUT/export/model_index.json" ]; then
  step export $PY export_diffusers.py "$OUT/diffusion/checkpoints/last.pt" "$OUT/export"
  rm "$OUT/export/guidelab.json"  # a third party's model carries no guidelab sidecar
fi
step classifier $PY train_classifier.py experiment=demo train.steps=1200 diffusion=pretrained \
  diffusion.model="diffusers:$OUT/export" hydra.run.dir="$OUT/classifier"
step evaluator $PY train_classifier.py experiment=demo classifier=evaluator hydra.run.dir="$OUT/evaluator"
step evaluator_vgg $PY train_classifier.py experiment=demo classifier=evaluator_vgg seed=1 hydra.run.dir="$OUT/evaluator_vgg"
step cg $PY sample.py -m experiment=demo ckpt="diffusers:$OUT/export" guidance=cg scale=0,3,10,20 \
  classifier_ckpt="$OUT/classifier/checkpoints/last.pt" evaluator_ckpt="$OUT/evaluator/checkpoints/last.pt" \
  second_evaluator_ckpt="$OUT/evaluator_vgg/checkpoints/last.pt" hydra.sweep.dir="$OUT/cg"
echo "table: $OUT/cg/results.md"
