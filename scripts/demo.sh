#!/usr/bin/env bash
# The CPU quickstart (`make demo`): train the diffusion UNet, the noisy classifier and the evaluator on the bundled
# MNIST digits, sample with CFG and CG at s = 0, 1, 3, and write the comparison figure and the accuracy table.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-outputs/demo/$(date +%Y-%m-%d_%H-%M-%S)}
start=$(date +%s)
$PY train_diffusion.py experiment=demo hydra.run.dir="$OUT/diffusion"
$PY train_classifier.py experiment=demo hydra.run.dir="$OUT/classifier"
$PY train_classifier.py experiment=demo classifier=evaluator hydra.run.dir="$OUT/evaluator"
$PY sample.py -m experiment=demo guidance=cfg,cg scale=0,1,3 \
    ckpt="$OUT/diffusion/checkpoints/last.pt" classifier_ckpt="$OUT/classifier/checkpoints/last.pt" \
    evaluator_ckpt="$OUT/evaluator/checkpoints/last.pt" hydra.sweep.dir="$OUT/samples"
# the sweep's report callback has written comparison.png, results.md / results.csv and the plots
echo "demo finished in $(( $(date +%s) - start )) s; figure: $OUT/samples/comparison.png, table: $OUT/samples/results.md"
