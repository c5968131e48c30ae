# Shared by the study scripts: the Python to use, the output dir, and training that skips finished runs.
# Source it with the preset name:  . "$(dirname "$0")/lib.sh" cg_vs_cfg
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXPERIMENT=$1
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/$EXPERIMENT/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT"
echo "experiment=$EXPERIMENT -> $OUT"

# train SCRIPT NAME [overrides...]: train into $OUT/NAME unless $OUT/NAME/checkpoints/last.pt exists (re-runnable)
train() {
  local script=$1 name=$2; shift 2
  if [ -f "$OUT/$name/checkpoints/last.pt" ]; then echo "reusing $OUT/$name"; return; fi
  local t0; t0=$(date +%s)
  $PY "$script" "experiment=$EXPERIMENT" "hydra.run.dir=$OUT/$name" "$@"
  echo "$name trained in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/timings.txt"
}

# sweep NAME [overrides...]: a sample.py -m sweep into $OUT/NAME (its report callback writes results.csv and plots),
# unless $OUT/NAME/results.csv exists (re-runnable)
sweep() {
  local name=$1; shift
  if [ -f "$OUT/$name/results.csv" ]; then echo "reusing $OUT/$name"; return; fi
  local t0; t0=$(date +%s)
  $PY sample.py -m "experiment=$EXPERIMENT" "hydra.sweep.dir=$OUT/$name" "$@"
  echo "$name swept in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/timings.txt"
}

# train_guidance_set: the UNet, the noisy classifier and the two evaluators (a ResNet; a VGG with another seed) into
# $OUT/{diffusion,classifier,evaluator,evaluator_vgg}; NETS then holds the four checkpoint overrides of sample.py
train_guidance_set() {
  train train_diffusion.py diffusion
  train train_classifier.py classifier
  train_evaluators
  NETS=(ckpt="$OUT/diffusion/checkpoints/last.pt" classifier_ckpt="$OUT/classifier/checkpoints/last.pt" "${EVALS[@]}")
}

# The judges' recipe on Fashion-MNIST at 16x16: 6,000 steps of 128 (12.8 epochs), 1-pixel shifts, no rotation (garments
# are upright and centred; the digits' 10 degrees and 2 pixels cost 4 points here). Held-out: ResNet 91.9%.
JUDGE=(train.steps=6000 train.batch_size=128 classifier.shift=1 classifier.rotate=0)

# train_evaluators [overrides...]: the two judges into $OUT/{evaluator,evaluator_vgg}; EVALS holds their sample.py
# overrides
train_evaluators() {
  train train_classifier.py evaluator classifier=evaluator "${JUDGE[@]}" "$@"
  train train_classifier.py evaluator_vgg classifier=evaluator_vgg seed=1 "${JUDGE[@]}" "$@"
  EVALS=(evaluator_ckpt="$OUT/evaluator/checkpoints/last.pt"
         second_evaluator_ckpt="$OUT/evaluator_vgg/checkpoints/last.pt")
}
