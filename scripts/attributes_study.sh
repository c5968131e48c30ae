#!/usr/bin/env bash
# The attribute study (docs/results.md, "Attributes"): on the bundled digits at 16x16, a UNet conditioned on the class,
# thickness and slant (joint and composed CFG) against a class-only UNet guided by a noisy classifier and a noisy
# attribute regressor (composed CG), for 1, 2 and 3 conditions in and out of the training range; then the price of
# retraining: a new attribute (thickness) asked of the class-only model, by fine-tuning it (CFG) or by training a
# regressor (CG), success against training compute. Every run is judged by measurement (guidelab.morpho), the ResNet
# evaluator and the k-NN judge. Re-runnable: finished runs are reused. Tables: python scripts/attributes_study.py $OUT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/attributes/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT"

train() {  # train SCRIPT NAME [overrides...] into $OUT/NAME unless it is there; its wall time into timings.txt
  local script=$1 name=$2; shift 2
  if [ -f "$OUT/$name/checkpoints/last.pt" ]; then echo "reusing $OUT/$name"; return; fi
  local t0; t0=$(date +%s)
  $PY "$script" "hydra.run.dir=$OUT/$name" train.progress=false "$@"
  echo "$name trained in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/timings.txt"
}
sweep() {  # sweep NAME [overrides...]: a sample.py -m sweep into $OUT/NAME unless it is there
  local name=$1; shift
  if [ -f "$OUT/$name/results.csv" ]; then echo "reusing $OUT/$name"; return; fi
  $PY sample.py -m experiment=attributes progress=false "hydra.sweep.dir=$OUT/$name" "$@"
}

train train_diffusion.py unet_attrs experiment=attributes                       # class, thickness, slant
train train_diffusion.py unet_class experiment=attributes "model.attributes=[]"  # class only, same size and steps
train train_classifier.py regressor experiment=attributes                       # thickness and slant from x_t
train train_classifier.py classifier experiment=demo train.steps=1200           # the class from x_t
train train_classifier.py evaluator experiment=demo classifier=evaluator        # the judge (a ResNet)
JUDGE=(evaluator_ckpt="$OUT/evaluator/checkpoints/last.pt")
ATTRS=(ckpt="$OUT/unet_attrs/checkpoints/last.pt" "${JUDGE[@]}")
CLASS_ONLY=(ckpt="$OUT/unet_class/checkpoints/last.pt" classifier_ckpt="$OUT/classifier/checkpoints/last.pt" "${JUDGE[@]}")
GUIDED=("${CLASS_ONLY[@]}" regressor_ckpt="$OUT/regressor/checkpoints/last.pt")

# 1, 2 and 3 conditions; thickness 5.5 and slant 0.8 lie beyond the training data's 99th percentiles
ONE=(labels=any "attrs.thickness=[1.5,2.5,3.5,4.5]")
TWO=("attrs.thickness=[1.5,2.5,3.5,4.5]")
THREE=("attrs.thickness=[1.5,3.5]" "attrs.slant=[-0.2,0.4]")
OUTSIDE=("attrs.thickness=[5.5]" "attrs.slant=[0.8]")
for req in ONE TWO THREE OUTSIDE; do
  eval "R=(\"\${${req}[@]}\")"
  sweep "${req,,}_cfg" guidance=cfg,cfg_composed scale=3 "${ATTRS[@]}" "${R[@]}"
  sweep "${req,,}_cg" guidance=cg scale=3,10 "${GUIDED[@]}" "${R[@]}"
  sweep "${req,,}_cfg_s1" guidance=cfg scale=1 "${ATTRS[@]}" "${R[@]}"   # the conditional model, unguided
done

# the clean guides on x0_hat: a clean regressor and a clean classifier, cg_x0 through the class-only UNet
train train_classifier.py clean_regressor experiment=attributes classifier.noisy=false
train train_classifier.py clean_classifier experiment=demo classifier=clean
sweep two_cg_x0 guidance=cg_x0 scale=3,10 ckpt="$OUT/unet_class/checkpoints/last.pt" "${JUDGE[@]}" "${TWO[@]}" \
  classifier_ckpt="$OUT/clean_classifier/checkpoints/last.pt" regressor_ckpt="$OUT/clean_regressor/checkpoints/last.pt"

# the reference: each UNet asked for the class alone (the FID of the goals is read against the class-only model's)
sweep baseline_class guidance=cfg scale=1,3 "${CLASS_ONLY[@]}"
sweep baseline_attrs guidance=cfg scale=1,3 "${ATTRS[@]}"

# The price of retraining: thickness asked of the class-only model (the class by its own CFG at s = 3), by fine-tuning
# it with the new input (CFG at s = 1 and 3) or by a regressor trained on its schedule (CG, weight 10)
train train_diffusion.py finetune experiment=attributes "model.attributes=[thickness]" \
  train.init_from="$OUT/unet_class/checkpoints/last.pt" train.steps=1000 train.warmup_steps=50 train.lr=1.0e-3 \
  train.ckpt_every=250 train.keep_checkpoints=10
train train_classifier.py regressor_price experiment=attributes "classifier.attributes=[thickness]" \
  train.ckpt_every=100 train.eval_every=100 train.keep_checkpoints=10
for step in 0000250 0000500 0000750; do
  sweep "price_cfg_$step" guidance=cfg scale=1,3 ckpt="$OUT/finetune/checkpoints/$step.pt" "${JUDGE[@]}" "${TWO[@]}"
done
sweep price_cfg_last guidance=cfg scale=1,3 ckpt="$OUT/finetune/checkpoints/last.pt" "${JUDGE[@]}" "${TWO[@]}"
for step in 0000100 0000200 0000300 0000400 0000500 last; do
  sweep "price_cg_$step" guidance=cfg_cg scale=3 guidance.classifier_scale=10 weights.label=0 "${CLASS_ONLY[@]}" \
    "${TWO[@]}" regressor_ckpt="$OUT/regressor_price/checkpoints/$step.pt"
done

# Composition the data never showed: the thickest fifth of the 7s (thickness above 3.16 px, their 0.8-quantile) left
# out of every guided network's training (both UNets, the classifier, the regressor; the judge keeps them). The split
# networks and the full ones are asked for 7s of thickness 2.5 (seen by both), 3.5 and 4.5 (held out of the split)
SPLIT=("exclude='7:thickness>0.8'")
train train_diffusion.py split_attrs experiment=attributes "${SPLIT[@]}"
train train_diffusion.py split_class experiment=attributes "model.attributes=[]" "${SPLIT[@]}"
train train_classifier.py split_regressor experiment=attributes "${SPLIT[@]}"
train train_classifier.py split_classifier experiment=demo train.steps=1200 "${SPLIT[@]}"
SEVENS=("labels=[7]" "attrs.thickness=[2.5,3.5,4.5]" num_samples=300 eval.num_samples=300)
SPLIT_GUIDED=(ckpt="$OUT/split_class/checkpoints/last.pt" classifier_ckpt="$OUT/split_classifier/checkpoints/last.pt"
  regressor_ckpt="$OUT/split_regressor/checkpoints/last.pt" "${JUDGE[@]}")
for nets in split full; do
  if [ $nets = split ]; then A=(ckpt="$OUT/split_attrs/checkpoints/last.pt" "${JUDGE[@]}"); G=("${SPLIT_GUIDED[@]}")
  else A=("${ATTRS[@]}"); G=("${GUIDED[@]}"); fi
  sweep "sevens_${nets}_cfg" guidance=cfg,cfg_composed scale=3 "${A[@]}" "${SEVENS[@]}"
  sweep "sevens_${nets}_cfg_s1" guidance=cfg scale=1 "${A[@]}" "${SEVENS[@]}"
  sweep "sevens_${nets}_cg" guidance=cg scale=3,10 "${G[@]}" "${SEVENS[@]}"
done
$PY scripts/attributes_study.py "$OUT"
