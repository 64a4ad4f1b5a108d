#!/usr/bin/env bash
# The GPU session's one command (about 10 minutes on an H100): the CUDA correctness checks, the SKF step
# ratios eager and compiled (DRBN, SNR-Net; every family eager), prior precompute throughput over 1,000
# generated 400x600 images with the GPU's utilisation sampled meanwhile, the data-wait share of the step
# (benchmarks/data_wait.py: the training job with the recipe's input pipeline, SNR-Net-SKF and
# LLFlow-L-SKF), and the peak GPU memory of each SKF step. Results: benchmarks/results/<gpu>-<date>/ (JSON and markdown), to be recorded in
# benchmarks/RESULTS.md with the card's name.
#
#   benchmarks/gpu_check.sh            # on the GPU machine
#   benchmarks/gpu_check.sh --smoke    # the same pipeline on CPU at toy sizes (what the test suite runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; fi

if ((smoke)); then
  device=cpu
  card=cpu-smoke
  timing=(--warmup 0 --steps 1 --batch 1 --crop 32 --threads 1 --malloc glibc --no-shares)
  ratio_models=drbn
  compile_mode=default
  compiled_variants=(--variants a) # inductor's C++ builds take minutes on CPU; tests/test_compile.py checks SKF
  images=2
  size=(--height 64 --width 96 --threads 1)
  wait_recipes=snr-net-skf
  wait_args=(--steps 4 --warmup 1 --images 4 --height 64 --width 96 --crop 32 --batch 2)
else
  device=cuda
  card="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).lower().replace(" ", "-"))')"
  timing=(--warmup 3 --steps 10 --malloc glibc)
  ratio_models=drbn,snr-net
  compile_mode=reduce-overhead
  compiled_variants=()
  images=1000
  size=(--height 400 --width 600)
  wait_recipes="snr-net-skf llflow-l-skf"
  wait_args=(--steps 60 --warmup 10 --images 64)
fi
out="${SKF_GPU_CHECK_OUT:-benchmarks/results/${card}-$(date -u +%F)}"
mkdir -p "$out"
echo "[gpu_check] $card: results in $out"

if ((!smoke)); then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv"
  "$PY" benchmarks/cuda_checks.py --json "$out/cuda_checks.json"
fi

step() { # $1: name of the result files; the rest: train_step.py arguments
  local name="$1"
  shift
  "$PY" benchmarks/train_step.py --device "$device" --variants a,b,b-nosa "${timing[@]}" "$@" \
    --json "$out/$name.json" --markdown "$out/$name.md"
}
step step-eager --models "$ratio_models"
step step-compiled --models "$ratio_models" --compile "$compile_mode" "${compiled_variants[@]}"
if ((!smoke)); then
  step step-all-families --models "" --warmup 2 --steps 5
fi

if ((!smoke)); then
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
    >"$out/precompute-gpu-utilisation.csv" &
  sampler=$!
fi
"$PY" benchmarks/precompute.py --device "$device" --images "$images" "${size[@]}" --batch-size 8 \
  --json "$out/precompute.json"
if ((!smoke)); then
  kill "$sampler"
fi
for recipe in $wait_recipes; do # data-wait share of the step with the recipe's input pipeline
  "$PY" benchmarks/data_wait.py --device "$device" --recipe "$recipe" "${wait_args[@]}" \
    --json "$out/data-wait-$recipe.json"
done
if ((!smoke)); then
  "$PY" benchmarks/gpu_memory.py --json "$out/gpu_memory.json"
fi
echo "[gpu_check] done: $out"
