#!/usr/bin/env bash
# Ho & Salimans 2022, Table 1: one UNet per p_uncond in {0.1, 0.2, 0.5}, each swept over w = s - 1.
#   OUT=outputs/ho_salimans_table1/run1 bash scripts/ho_salimans_table1.sh
. "$(dirname "$0")/lib.sh" ho_salimans_table1
train_evaluators
for p in ${P_UNCOND:-0.1 0.2 0.5}; do
  train train_diffusion.py "diffusion_p$p" model.p_uncond="$p"
  sweep "sweep_p$p" scale=1,1.1,1.2,1.3,1.4,1.5,1.6,1.8,2,3,4,5 ckpt="$OUT/diffusion_p$p/checkpoints/last.pt" \
    "${EVALS[@]}"
done
$PY -m guidelab.report --merge "$OUT" "$OUT"/sweep_p*   # one table and one FID-IS plot, a line per p_uncond
