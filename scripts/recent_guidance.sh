#!/usr/bin/env bash
# Guidance of 2023-2026 on one UNet against plain CFG and CG (Fashion-MNIST, 16x16), judged by the two independent
# evaluators; then the fair comparison on a purely conditional UNet (model.p_uncond=0, same size and budget): CG on its
# conditional prediction, cg_x0, ICG, TSG and PAG against CFG on the p_uncond = 0.1 UNet.
#   OUT=outputs/recent_guidance/run1 bash scripts/recent_guidance.sh   (re-running skips finished trainings and sweeps;
#   pointed at a cg_vs_cfg run's OUT it reuses its networks and its CFG and CG sweeps)
. "$(dirname "$0")/lib.sh" recent_guidance
train_guidance_set
train train_classifier.py clean classifier=clean
train train_diffusion.py diffusion_p0 model.p_uncond=0
sweep cfg guidance=cfg scale=0,1,2,3,4 "${NETS[@]}"
sweep cg guidance=cg scale=1,2,4,8,15 "${NETS[@]}"
for mode in icg tcfg mambo fdg cads; do
  sweep "$mode" guidance="$mode" scale=1.5,2,3 "${NETS[@]}"
done
for mode in tsg pag seg; do  # guidance away from a perturbed conditional pass: weaker per unit of s
  sweep "$mode" guidance="$mode" scale=2,3,5 "${NETS[@]}"
done
sweep cfg_linear guidance=cfg schedule=linear scale=2,3,4 "${NETS[@]}"
sweep cfg_cosine guidance=cfg schedule=cosine scale=2,3,4 "${NETS[@]}"
$PY -m guidelab.report --merge "$OUT/recent" "$OUT"/{cfg,cg,icg,tcfg,mambo,fdg,cads,tsg,pag,seg,cfg_linear,cfg_cosine}
# p_uncond = 0: no null class was trained, so CFG is not available; every method below guides eps(x_t, y)
P0=(ckpt="$OUT/diffusion_p0/checkpoints/last.pt" "${EVALS[@]}")
sweep p0_none guidance=none scale=1 "${P0[@]}"
sweep p0_cg guidance=cg guidance.base=cond scale=1,2,4,8 "${P0[@]}" classifier_ckpt="$OUT/classifier/checkpoints/last.pt"
sweep p0_cg_x0 guidance=cg_x0 guidance.base=cond scale=1,2,4 "${P0[@]}" classifier_ckpt="$OUT/clean/checkpoints/last.pt"
sweep p0_icg guidance=icg scale=1.5,2,3 "${P0[@]}"
for mode in tsg pag; do
  sweep "p0_$mode" guidance="$mode" scale=2,3,5 "${P0[@]}"
done
$PY -m guidelab.report --merge "$OUT/p_uncond0" "$OUT"/{cfg,p0_none,p0_cg,p0_cg_x0,p0_icg,p0_tsg,p0_pag}
