#!/usr/bin/env bash
# The accelerator measurements in one command, within a time budget: for
# each headline model, benchmarks/throughput.py --preset accelerator (bf16,
# batch 128; the official PyTorch model beside it under bf16 autocast when
# its checkouts are given), and benchmarks/kernel_forms.py (each kernel's
# forms A/B at the models' shapes). Each step gets what is left of the
# budget, at most its own cap, so a slow compile costs that step alone; every
# row is printed, and written to its JSON file, as it is measured; the log
# and the JSON files go to OUT_DIR. The caps are what one H200 needed
# (BENCHMARKS.md, 2026-12-04): the bf16 forwards compiled in 24-26 s, while
# GLNet-STL's train step had not finished compiling after ~110 s, so all of
# it takes more than one 10-minute call there.
#
#   bash benchmarks/accelerator.sh OUT_DIR [BUDGET_S] [GLMIX_CHECKOUT ACMIX_CHECKOUT]
set -uo pipefail
out=${1:?usage: accelerator.sh OUT_DIR [BUDGET_S] [GLMIX ACMIX]}
budget=${2:-570}
official=()
[[ $# -ge 4 ]] && official=(--torch_python="$(command -v python3)" --official "$3" "$4")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log=$out/log.txt
start=$SECONDS

step() {  # step CAP_S NAME COMMAND...: run COMMAND within min(CAP_S, budget left)
  local cap=$1 name=$2 left=$((budget - (SECONDS - start)))
  shift 2
  ((left < cap)) && cap=$left
  if ((cap < 20)); then
    echo "== $name: skipped, budget spent" | tee -a "$log"
    return
  fi
  echo "== $name (at most ${cap} s, at ${SECONDS} s)" | tee -a "$log"
  timeout --kill-after=5 "$cap" "$@" 2>&1 | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$log"
}

{ nvidia-smi; python3 -c 'import jax, flax, torch; print(jax.__version__, flax.__version__, torch.__version__, jax.devices())'; } \
  >"$out/machine.txt" 2>&1
step 300 glnet_stl python3 benchmarks/throughput.py --preset accelerator \
  --models glnet_stl "${official[@]}" --json "$out/throughput_glnet_stl.json"
step 150 kernel_forms python3 benchmarks/kernel_forms.py --batch 128 \
  --dtype bfloat16 --repeats 5 --budget_s 0.3 --json "$out/kernel_forms.json"
for model in acmix_swin_t acmix_resnet50 glnet_4g; do
  step 150 "$model" python3 benchmarks/throughput.py --preset accelerator \
    --models "$model" "${official[@]}" --json "$out/throughput_$model.json"
done
