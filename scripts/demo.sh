#!/usr/bin/env bash
# The CPU quickstart (`make demo`): train the diffusion UNet, the noisy classifier and the two evaluators (a ResNet and
# a VGG, neither of the guided networks' family) on the bundled MNIST digits, sweep CFG and CG over their scales, and
# write the comparison figure and the table (each mode at its best scale, read by both evaluators).
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-outputs/demo/$(date +%Y-%m-%d_%H-%M-%S)}
start=$(date +%s)
$PY train_diffusion.py experiment=demo hydra.run.dir="$OUT/diffusion"
$PY train_classifier.py experiment=demo train.steps=1200 hydra.run.dir="$OUT/classifier"  # CG is classifier-limited
$PY train_classifier.py experiment=demo classifier=evaluator hydra.run.dir="$OUT/evaluator"
$PY train_classifier.py experiment=demo classifier=evaluator_vgg seed=1 hydra.run.dir="$OUT/evaluator_vgg"
NETS=(ckpt="$OUT/diffusion/checkpoints/last.pt" classifier_ckpt="$OUT/classifier/checkpoints/last.pt"
      evaluator_ckpt="$OUT/evaluator/checkpoints/last.pt" second_evaluator_ckpt="$OUT/evaluator_vgg/checkpoints/last.pt")
$PY sample.py -m experiment=demo guidance=cfg scale=0,1,3 "${NETS[@]}" hydra.sweep.dir="$OUT/cfg"
$PY sample.py -m experiment=demo guidance=cg scale=3,10,20 "${NETS[@]}" hydra.sweep.dir="$OUT/cg"
$PY -m guidelab.report --merge "$OUT/samples" "$OUT/cfg" "$OUT/cg" > /dev/null
echo "demo finished in $(( $(date +%s) - start )) s; figure: $OUT/samples/comparison.png, table: $OUT/samples/results.md"
