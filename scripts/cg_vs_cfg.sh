#!/usr/bin/env bash
# CG vs CFG on one UNet, judged by two evaluators of other families: train the UNet, the noisy classifier (800 steps,
# and 3200 for the classifier-budget study), a clean classifier for cg_x0 and the two evaluators; sweep CFG, CG with
# each classifier up to Dhariwal & Nichol's scales, and cg_x0 (a clean classifier through the denoised estimate).
#   OUT=outputs/cg_vs_cfg/run1 bash scripts/cg_vs_cfg.sh      (re-running skips finished trainings)
. "$(dirname "$0")/lib.sh" cg_vs_cfg
train_guidance_set
train train_classifier.py classifier_3200 train.steps=3200
train train_classifier.py clean classifier=clean
UNET=(ckpt="$OUT/diffusion/checkpoints/last.pt" "${EVALS[@]}")
sweep cfg guidance=cfg scale=0,1,2,3,4 "${UNET[@]}"
sweep cg guidance=cg scale=1,2,4,8,15 "${UNET[@]}" classifier_ckpt="$OUT/classifier/checkpoints/last.pt"
sweep cg_3200 guidance=cg scale=1,2,4,8,15 "${UNET[@]}" classifier_ckpt="$OUT/classifier_3200/checkpoints/last.pt"
sweep cg_x0 guidance=cg_x0 scale=1,2,4,8 "${UNET[@]}" classifier_ckpt="$OUT/clean/checkpoints/last.pt"
$PY -m guidelab.report --merge "$OUT/all" "$OUT/cfg" "$OUT/cg" "$OUT/cg_3200" "$OUT/cg_x0"
