#!/usr/bin/env bash
# CG vs CFG on one UNet: train the UNet, the noisy classifier and the evaluator, then sweep both modes at the same
# number of sampler steps, and CG once more at matched UNet evaluations (a CFG step is two UNet passes, so CFG at 25
# steps and CG at 50 steps both cost 50 UNet passes per sample; CG adds a classifier forward+backward per step).
#   OUT=outputs/cg_vs_cfg/run1 bash scripts/cg_vs_cfg.sh      (re-running skips finished trainings)
. "$(dirname "$0")/lib.sh" cg_vs_cfg
train_guidance_set
sweep sweep guidance=cfg,cg scale=0,0.5,1,2,3,4 "${NETS[@]}"
sweep sweep_cg_matched_nfe guidance=cg scale=0,0.5,1,2,3,4 sampler.steps=50 "${NETS[@]}"
$PY -m guidelab.report --merge "$OUT" "$OUT/sweep" "$OUT/sweep_cg_matched_nfe"
