#!/usr/bin/env bash
# Issue 21's study: classifier guidance as the literature since 2022 makes it, against CFG and its one-pass rivals, on
# the Fashion-MNIST 16x16 setting of scripts/cg_vs_cfg.sh (the same UNet, classifiers and judges: point OUT at a
# finished cg_vs_cfg run to reuse them). Trains the entropy-constrained and the robust noisy classifier, then sweeps
# every method; each sweep's results.csv holds the accuracy by three judges, FID, NFE and seconds per sample.
#   OUT=outputs/cg_vs_cfg/run1 bash scripts/cg_2022.sh        (re-running skips finished trainings and sweeps)
#   STAGE=train ... trains only; STAGE=sweep ... sweeps only
. "$(dirname "$0")/lib.sh" cg_vs_cfg
STAGE=${STAGE:-all}
if [ "$STAGE" != sweep ]; then
  train_guidance_set
  train train_classifier.py classifier_3200 train.steps=3200
  train train_classifier.py clean classifier=clean
  train train_classifier.py classifier_ect train.steps=3200 classifier.entropy_weight=0.2
  train train_classifier.py classifier_robust train.steps=3200 classifier.pgd_eps=0.5 classifier.pgd_steps=2 \
    classifier.pgd_norm=l2
fi
[ "$STAGE" = train ] && exit 0
train_evaluators
UNET=(ckpt="$OUT/diffusion/checkpoints/last.pt" "${EVALS[@]}")
C3200=classifier_ckpt="$OUT/classifier_3200/checkpoints/last.pt"
CLEAN=classifier_ckpt="$OUT/clean/checkpoints/last.pt"
sweep cfg guidance=cfg scale=0,1,2,3,4 "${UNET[@]}"
sweep cfg_interval guidance=cfg_interval scale=2,3,4,6 "${UNET[@]}"
sweep fbg guidance=fbg scale=2,3,5,10 "${UNET[@]}"
sweep cg_3200 guidance=cg scale=1,2,4,8,15 "${UNET[@]}" "$C3200"
sweep cg_entropy guidance=cg guidance.entropy_scale=true scale=1,2,4,8 "${UNET[@]}" "$C3200"
sweep cg_ect guidance=cg scale=1,2,4,8,15 "${UNET[@]}" classifier_ckpt="$OUT/classifier_ect/checkpoints/last.pt"
sweep cg_ect_entropy guidance=cg guidance.entropy_scale=true scale=1,2,4,8 "${UNET[@]}" \
  classifier_ckpt="$OUT/classifier_ect/checkpoints/last.pt"
sweep cg_robust guidance=cg scale=1,2,4,8,15 "${UNET[@]}" classifier_ckpt="$OUT/classifier_robust/checkpoints/last.pt"
sweep cg_recurrence guidance=cg sampler.recurrence=2 scale=2,4,8 "${UNET[@]}" "$C3200"
sweep cg_x0 guidance=cg_x0 scale=1,2,4,8 "${UNET[@]}" "$CLEAN"
sweep cg_ots guidance=cg_ots scale=1,2,4,8,16 "${UNET[@]}" "$CLEAN"
sweep cg_universal guidance=cg_universal scale=1,2,4 "${UNET[@]}" "$CLEAN"
$PY -m guidelab.report --merge "$OUT/cg_2022" "$OUT"/{cfg,cfg_interval,fbg,cg_3200,cg_entropy,cg_ect,cg_ect_entropy} \
  "$OUT"/{cg_robust,cg_recurrence,cg_x0,cg_ots,cg_universal}
