#!/usr/bin/env bash
# Every guidance variant against plain CFG and CG on one UNet; DDIM vs DPM-Solver++(2M) vs Heun at 10 / 20 / 50 steps.
# Autoguidance gets two guides: the same run's 500-step checkpoint, and a 4x smaller UNet trained 500 steps.
#   OUT=outputs/guidance_variants/run1 bash scripts/guidance_variants.sh      (re-running skips finished trainings)
. "$(dirname "$0")/lib.sh" guidance_variants
train_guidance_set
train train_diffusion.py guide_small model.channels=16 train.steps=500
EARLY="$OUT/diffusion/checkpoints/0000500.pt"
sweep cfg guidance=cfg scale=1,1.5,2,3,4,6 "${NETS[@]}"
sweep cg guidance=cg scale=1,2,4,6,8 "${NETS[@]}"
sweep cfg_cg guidance=cfg_cg scale=2 guidance.classifier_scale=1,2,4 "${NETS[@]}"
sweep cfg_rescale guidance=cfg_rescale scale=1.5,2,3,4,6 "${NETS[@]}"
sweep cfg_interval guidance=cfg_interval scale=1.5,2,3,4,6 "${NETS[@]}"
sweep cg_interval guidance=cg_interval scale=2,4,6,8 "${NETS[@]}"
sweep apg guidance=apg scale=2,3,4,6,8 "${NETS[@]}"
sweep cfgpp guidance=cfgpp scale=0.2,0.4,0.6,0.8,1 "${NETS[@]}"
sweep dynamic_threshold guidance=dynamic_threshold scale=2,3,4,6,8 "${NETS[@]}"
sweep autoguidance_early guidance=autoguidance guide_ckpt="$EARLY" scale=1.5,2,3,4 "${NETS[@]}"
sweep autoguidance_small guidance=autoguidance guide_ckpt="$OUT/guide_small/checkpoints/last.pt" \
  scale=1.5,2,3,4 "${NETS[@]}"
$PY -m guidelab.report --merge "$OUT/variants" "$OUT"/{cfg,cg,cfg_cg,cfg_rescale,cfg_interval,cg_interval,apg,cfgpp} \
  "$OUT"/{dynamic_threshold,autoguidance_early,autoguidance_small}
# step-count study under guidance: each sampler at its default spacing, and DDIM on DPM-Solver's logSNR grid as control
sweep steps_cfg guidance=cfg scale=3 sampler=ddim,dpmpp_2m,heun sampler.steps=10,20,50 "${NETS[@]}"
sweep steps_cfg_ddim_logsnr guidance=cfg scale=3 sampler=ddim sampler.spacing=logsnr sampler.steps=10,20,50 "${NETS[@]}"
sweep steps_cg guidance=cg scale=4 sampler=ddim,dpmpp_2m,heun sampler.steps=10,20,50 "${NETS[@]}"
sweep steps_cg_ddim_logsnr guidance=cg scale=4 sampler=ddim sampler.spacing=logsnr sampler.steps=10,20,50 "${NETS[@]}"
$PY -m guidelab.report --merge "$OUT/steps" "$OUT"/steps_cfg "$OUT"/steps_cfg_ddim_logsnr "$OUT"/steps_cg \
  "$OUT"/steps_cg_ddim_logsnr
