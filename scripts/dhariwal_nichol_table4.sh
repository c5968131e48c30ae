#!/usr/bin/env bash
# Dhariwal & Nichol 2021, Table 4: CG of the unconditional vs the conditional prediction at s in {0, 1, 10}, and a
# finer scale sweep (their classifier-scale figure).
#   OUT=outputs/dhariwal_nichol_table4/run1 bash scripts/dhariwal_nichol_table4.sh
. "$(dirname "$0")/lib.sh" dhariwal_nichol_table4
train_guidance_set
sweep table4 guidance=cg guidance.base=uncond,cond scale=0,1,10 "${NETS[@]}"
sweep fine guidance=cg guidance.base=uncond,cond scale=0,0.5,1,2,3,5,7,10 "${NETS[@]}"
