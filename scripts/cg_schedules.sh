#!/usr/bin/env bash
# Classifier guidance on every schedule (docs/results.md, "Classifier guidance on every schedule"): the demo's setting
# (bundled MNIST digits at 16x16) with three diffusion models, each with a noisy classifier trained on its own
# schedule, and the demo's ResNet judge; then scripts/cg_schedules.py's table of sampler x grid.
#   guidelab's UNet, linear schedule, eps prediction   (the demo's model)
#   guidelab's UNet, cosine schedule, eps prediction   (diffusion=cosine)
#   a diffusers UNet2DModel trained by a plain diffusers loop: squaredcos_cap_v2, v-prediction (scripts/train_diffusers_plain.py)
# Re-running skips the finished steps. Table: $OUT/table.md (the code in PYTHONPATH's src/; default this checkout's).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/cg_schedules}
mkdir -p "$OUT"
step() {  # step NAME CMD...: run CMD unless $OUT/NAME holds a finished run
  local name=$1; shift
  if [ -f "$OUT/$name/checkpoints/last.pt" ] || [ -f "$OUT/$name/unet/config.json" ]; then echo "reusing $OUT/$name"; return; fi
  "$@"
}
step lin/diffusion $PY train_diffusion.py experiment=demo hydra.run.dir="$OUT/lin/diffusion"
step lin/classifier $PY train_classifier.py experiment=demo train.steps=1200 hydra.run.dir="$OUT/lin/classifier"
step cos/diffusion $PY train_diffusion.py experiment=demo diffusion=cosine hydra.run.dir="$OUT/cos/diffusion"
step cos/classifier $PY train_classifier.py experiment=demo train.steps=1200 diffusion=cosine \
  hydra.run.dir="$OUT/cos/classifier"
step vcos $PY scripts/train_diffusers_plain.py "$OUT/vcos" --schedule squaredcos_cap_v2 --prediction v_prediction \
  --steps 1500 --size 16
step vcos_classifier $PY train_classifier.py experiment=demo train.steps=1200 diffusion=pretrained \
  diffusion.model="diffusers:$OUT/vcos" hydra.run.dir="$OUT/vcos_classifier"
step evaluator $PY train_classifier.py experiment=demo classifier=evaluator hydra.run.dir="$OUT/evaluator"
$PY scripts/cg_schedules.py "$OUT" | tee "$OUT/table.md"
