#!/usr/bin/env bash
# One prepared device check (< 5 minutes): installs the carried wheels when hydra is missing, then runs the
# benchmark (ours and, if diffusers is importable, the peer; each speed lever on and off), the command contract (experiment=smoke) and the
# demo-size diffusion training on whatever device `device=auto` finds, and writes the figures to $OUT/gpu_check.txt
# and $OUT/bench.json. On a CPU-only machine it runs the same chain at tiny size (GPU_CHECK_DEMO_STEPS=50 demo steps).
#   OUT=/tmp/out bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
PY=${PY:-python}
mkdir -p "$OUT"
if ! $PY -c "import hydra" 2>/dev/null && [ -d wheels ]; then
  $PY -m pip install -q --no-index --find-links wheels hydra-core omegaconf antlr4-python3-runtime wandb
fi
$PY -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=offline
device=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
steps=${GPU_CHECK_DEMO_STEPS:-$([ "$device" = cpu ] && echo 50 || echo 1000)}
backend=$([ "$device" = cpu ] && echo aot_eager || echo inductor)  # inductor on a CPU compiles for minutes
W=$(mktemp -d)
report="$OUT/gpu_check.txt"
echo "device: $device" | tee "$report"
timed() {  # name command...: run it, log to $W/name.log, append "name seconds" to the report
  local name=$1; shift
  local t0; t0=$(date +%s%N)
  "$@" > "$W/$name.log" 2>&1 || { tail -20 "$W/$name.log"; exit 1; }
  printf '%-24s %8d ms\n' "$name" $(( ($(date +%s%N) - t0) / 1000000 )) | tee -a "$report"
}
timed bench                  $PY benchmarks/bench.py --levers --compile-backend "$backend" --json "$OUT/bench.json"
cat "$W/bench.log" | tee -a "$report"
timed smoke_train_diffusion  $PY train_diffusion.py experiment=smoke hydra.run.dir="$W/R1"
timed smoke_train_classifier $PY train_classifier.py experiment=smoke hydra.run.dir="$W/R2"
timed smoke_sample_cg        $PY sample.py experiment=smoke ckpt="$W/R1/checkpoints/last.pt" \
                               classifier_ckpt="$W/R2/checkpoints/last.pt" guidance=cg scale=3.0 hydra.run.dir="$W/R3"
timed smoke_sample_compiled  $PY sample.py experiment=smoke ckpt="$W/R1/checkpoints/last.pt" guidance=cfg compile=true \
                               compile_backend="$backend" hydra.run.dir="$W/R4"
timed demo_train_diffusion   $PY train_diffusion.py experiment=demo train.steps="$steps" train.progress=false \
                               hydra.run.dir="$W/D"
$PY - "$W/D/metrics.jsonl" <<'PY' | tee -a "$report"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train/img_per_s" in l]
rates = [r["train/img_per_s"] for r in rows[1:]] or [rows[-1]["train/img_per_s"]]
print(f"demo UNet training: {sum(rates) / len(rates):.0f} img/s (mean over log intervals after the first), "
      f"final loss {rows[-1]['train/loss']:.4f} at step {rows[-1]['step']}")
PY
cp "$W/R3/grid.png" "$OUT/smoke_grid.png"
cp "$W/D/samples/"*.png "$OUT/" 2>/dev/null || true
echo "figures in $report"
