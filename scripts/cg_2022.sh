#!/usr/bin/env bash
# The study of classifier guidance as the literature since 2022 makes it, against CFG and its one-pass rivals, on
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
  train train_classifier.py classifier_robust train.steps=3200 classifier.pgd_eps=0.5 classifier.pgd_steps=1 \
    classifier.pgd_norm=l2
  train train_diffusion.py diffusion_mg train.guidance_free=mg train.mg_w=0.5  # one pass = CFG at s = 2
  train train_diffusion.py diffusion_gft train.guidance_free=gft model.beta_embed=true
fi
[ "$STAGE" = train ] && exit 0
train_evaluators
UNET=(ckpt="$OUT/diffusion/checkpoints/last.pt" "${EVALS[@]}")
C3200=classifier_ckpt="$OUT/classifier_3200/checkpoints/last.pt"
CLEAN=classifier_ckpt="$OUT/clean/checkpoints/last.pt"
# The grid is sized for the 2-core CPU (500 samples per point, about a minute each on a quiet machine): each
# method at its interesting scales, read against CFG's s = 2 (accuracy 0.958, FID 1.01 in the cg_vs_cfg study).
sweep cfg guidance=cfg scale=1,2,3 "${UNET[@]}"
sweep fbg guidance=fbg scale=3,10 "${UNET[@]}"
sweep cg_3200 guidance=cg scale=4,15 "${UNET[@]}" "$C3200"
sweep cg_entropy guidance=cg guidance.entropy_scale=true scale=2,4 "${UNET[@]}" "$C3200"
sweep cg_ect guidance=cg scale=4,15 "${UNET[@]}" classifier_ckpt="$OUT/classifier_ect/checkpoints/last.pt"
sweep cg_recurrence guidance=cg sampler.recurrence=2 scale=8 "${UNET[@]}" "$C3200"
sweep cg_x0 guidance=cg_x0 scale=4 "${UNET[@]}" "$CLEAN"
sweep cg_ots guidance=cg_ots scale=4,16 "${UNET[@]}" "$CLEAN"
sweep cg_universal guidance=cg_universal scale=2 "${UNET[@]}" "$CLEAN"
# the clean-classifier modes again at low scales (s = 4 already broke the samples; added after the first pass)
sweep cg_ots_low guidance=cg_ots scale=0.5,1,2 "${UNET[@]}" "$CLEAN"
sweep cg_x0_low guidance=cg_x0 scale=1 "${UNET[@]}" "$CLEAN"
sweep cg_robust guidance=cg scale=4,15 "${UNET[@]}" classifier_ckpt="$OUT/classifier_robust/checkpoints/last.pt"
sweep mg guidance=none guidance.base=cond ckpt="$OUT/diffusion_mg/checkpoints/last.pt" "${EVALS[@]}"
sweep gft guidance=gft scale=2,3 ckpt="$OUT/diffusion_gft/checkpoints/last.pt" "${EVALS[@]}"
# added in the second pass: CFG limited to an interval of noise levels, and GFT at a higher scale
sweep cfg_interval guidance=cfg_interval scale=2,3,4 "${UNET[@]}"
sweep gft_4 guidance=gft scale=4 ckpt="$OUT/diffusion_gft/checkpoints/last.pt" "${EVALS[@]}"
$PY -m guidelab.report --merge "$OUT/cg_2022" "$OUT"/{cfg,fbg,cg_3200,cg_entropy,cg_ect,cg_recurrence,cg_x0,cg_ots} \
  "$OUT"/{cg_ots_low,cg_x0_low,cg_universal,cg_robust,mg,gft,cfg_interval,gft_4}

# Ma et al. 2023's setting: an off-the-shelf classifier guides, here the primary judge's own ResNet (ReLUs, so
# softplus smoothing applies). No ResNet may judge these rows: the VGG and a third family, an MLP-Mixer, read them,
# and the reference rows are sampled again (the same seeds, so the same images) to be read by the same two judges.
train train_classifier.py evaluator_mixer classifier=evaluator_mixer seed=2 "${JUDGE[@]}"
OTHER=(evaluator_ckpt="$OUT/evaluator_vgg/checkpoints/last.pt"
       second_evaluator_ckpt="$OUT/evaluator_mixer/checkpoints/last.pt")
RESNET=classifier_ckpt="$OUT/evaluator/checkpoints/last.pt"
OFF=(ckpt="$OUT/diffusion/checkpoints/last.pt" "${OTHER[@]}")
sweep ots_resnet guidance=cg_ots guidance.softplus_beta=3 scale=0.5,1,2 "${OFF[@]}" "$RESNET"
sweep ots_resnet_relu guidance=cg_ots guidance.softplus_beta=0 scale=1 "${OFF[@]}" "$RESNET"
sweep ots_resnet_entropy guidance=cg_ots guidance.softplus_beta=3 guidance.entropy_scale=true scale=1 "${OFF[@]}" \
  "$RESNET"
sweep ref_cfg guidance=cfg scale=2 "${OFF[@]}"
sweep ref_cg guidance=cg guidance.entropy_scale=false,true scale=4 "${OFF[@]}" "$C3200"
sweep ref_ots_clean guidance=cg_ots scale=1 "${OFF[@]}" "$CLEAN"
sweep ref_mg guidance=none guidance.base=cond ckpt="$OUT/diffusion_mg/checkpoints/last.pt" "${OTHER[@]}"
$PY -m guidelab.report --merge "$OUT/cg_2022_offshelf" "$OUT"/{ots_resnet,ots_resnet_relu,ots_resnet_entropy} \
  "$OUT"/{ref_cfg,ref_cg,ref_ots_clean,ref_mg}
