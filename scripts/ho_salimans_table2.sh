#!/usr/bin/env bash
# Ho & Salimans 2022, Table 2: sampling steps at w = 0.3 (s = 1.3), ancestral sampling.
#   OUT=outputs/ho_salimans_table2/run1 bash scripts/ho_salimans_table2.sh
. "$(dirname "$0")/lib.sh" ho_salimans_table2
train train_diffusion.py diffusion
train_evaluators
sweep sweep sampler.steps=16,32,64,128,256 ckpt="$OUT/diffusion/checkpoints/last.pt" "${EVALS[@]}"
