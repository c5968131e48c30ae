#!/usr/bin/env bash
# The CG-of-2022 study's compute axis in wall seconds, measured alone: one point of each method of scripts/cg_2022.sh (its
# networks: point OUT at the same dir), 200 samples in one batch of 200, 25 DDIM steps, read by the VGG judge only
# (eval=false: no FID; the judge runs after the timed loop). Run it with nothing else on the machine: the study's own
# seconds were measured with several jobs sharing the cores.
#   OUT=outputs/cg_vs_cfg/run1 bash scripts/cg_2022_seconds.sh
#   python scripts/study_table.py OUT/seconds/merged/results.csv
. "$(dirname "$0")/lib.sh" cg_vs_cfg
N=$OUT
BASE=(evaluator_ckpt="$N/evaluator_vgg/checkpoints/last.pt" num_samples=200 batch_size=200 eval=false)
UNET=(ckpt="$N/diffusion/checkpoints/last.pt" "${BASE[@]}")
C3200=classifier_ckpt="$N/classifier_3200/checkpoints/last.pt"
CLEAN=classifier_ckpt="$N/clean/checkpoints/last.pt"
OUT=$N/seconds  # sweep() writes into $OUT/NAME
sweep none guidance=none guidance.base=cond "${UNET[@]}"
sweep mg guidance=none guidance.base=cond ckpt="$N/diffusion_mg/checkpoints/last.pt" "${BASE[@]}"
sweep gft guidance=gft scale=3 ckpt="$N/diffusion_gft/checkpoints/last.pt" "${BASE[@]}"
sweep cfg guidance=cfg scale=2 "${UNET[@]}"
sweep cfg_interval guidance=cfg_interval scale=3 "${UNET[@]}"
sweep fbg guidance=fbg scale=3 "${UNET[@]}"
sweep cg guidance=cg scale=4 "${UNET[@]}" "$C3200"
sweep cg_entropy guidance=cg guidance.entropy_scale=true scale=4 "${UNET[@]}" "$C3200"
sweep cg_recurrence guidance=cg sampler.recurrence=2 scale=8 "${UNET[@]}" "$C3200"
sweep cg_x0 guidance=cg_x0 scale=1 "${UNET[@]}" "$CLEAN"
sweep cg_ots guidance=cg_ots scale=1 "${UNET[@]}" "$CLEAN"
sweep cg_ots_resnet guidance=cg_ots guidance.softplus_beta=3 scale=1 "${UNET[@]}" \
  classifier_ckpt="$N/evaluator/checkpoints/last.pt"
sweep cg_universal guidance=cg_universal scale=2 "${UNET[@]}" "$CLEAN"
$PY -m guidelab.report --merge "$OUT/merged" "$OUT"/{none,mg,gft,cfg,cfg_interval,fbg,cg,cg_entropy,cg_recurrence} \
  "$OUT"/{cg_x0,cg_ots,cg_ots_resnet,cg_universal}
