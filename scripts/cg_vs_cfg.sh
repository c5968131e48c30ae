#!/usr/bin/env bash
# CG vs CFG on one UNet: train the UNet, the noisy classifier and the evaluator, then sweep both modes.
#   OUT=outputs/cg_vs_cfg/run1 bash scripts/cg_vs_cfg.sh      (re-running skips finished trainings)
. "$(dirname "$0")/lib.sh" cg_vs_cfg
train train_diffusion.py diffusion
train train_classifier.py classifier
train train_classifier.py evaluator classifier=evaluator
sweep sweep guidance=cfg,cg scale=0,0.5,1,2,3,4 ckpt="$OUT/diffusion/checkpoints/last.pt" \
  classifier_ckpt="$OUT/classifier/checkpoints/last.pt" evaluator_ckpt="$OUT/evaluator/checkpoints/last.pt"
