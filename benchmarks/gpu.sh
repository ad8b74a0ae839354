#!/usr/bin/env bash
# The GPU measurements the docs quote and the open issues ask for, one section at a time, each logged with the
# device under $OUT (default gpu-results/). Usage:
#   bash benchmarks/gpu.sh [paper-lite] [bench] [compile-cache] [variants] [refill] [fidelity] [defenses] [fedavg]
#                          [batches] [eager]
# (no argument: all, in that order; paper-lite is the issue-8 target: <= 10 min end to end on one H100/H200).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
py=${PYTHON:-python}
sections=${*:-paper-lite bench compile-cache variants refill fidelity defenses fedavg batches eager}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch; print('torch', torch.__version__)" | tee -a "$out/device.txt"

timed() {  # timed <name> <command...>: run, keep its output, note its wall time and exit code
  local name=$1; shift
  local t0; t0=$(date +%s)
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
}

for s in $sections; do
  case $s in
    paper-lite) timed paper-lite bash -c "$py -m dia.grid sweeps/paper-lite.yaml --run-all --results-root '$out/results' \
                  && $py -m dia.report '$out/results/paper-lite'" ;;
    bench) timed bench $py -m dia.bench --models mlp,vit --attacks dia --ks 512 --compile-ks 512 \
             --variants default,reduce-overhead,tf32 --no-lightning --out "$out/bench.json" ;;
    compile-cache) timed compile-cache $py benchmarks/compile_cache.py model=vit data=cifar10 num_victims=16 ;;
    variants) timed variants $py benchmarks/variants.py default reduce-overhead tf32 -- data=cifar10 model=vit \
                model.dropout=0.25 num_victims=16 attack.max_iterations=3000 run.seed=43 ;;
    refill) timed refill $py benchmarks/refill.py --rows 96 --victims 16 data=cifar10 model=vit attack.max_iterations=3000 ;;
    fidelity) timed fidelity bash -c "$py -m dia.grid sweeps/fidelity-cifar10-vit.yaml --run-all --results-root '$out/results' \
                && $py -m dia.report '$out/results/fidelity-cifar10-vit'" ;;
    defenses) timed defenses bash -c "$py -m dia.grid sweeps/defenses --run-all --results-root '$out/results' \
                && $py -m dia.report '$out/results/defenses'" ;;
    fedavg) timed fedavg bash -c "$py benchmarks/fedavg.py --steps 1,2,5,10 --problems 64 -- data=cifar10 model=vit \
              model.dropout=0.5 run.seed=43 && $py -m dia.grid sweeps/fedavg-vit.yaml --run-all --results-root '$out/results' \
              && $py -m dia.report '$out/results/fedavg-vit'" ;;  # ~0.5 GPU-h projected (docs/fedavg.md)
    batches) timed batches bash -c "$py -m dia.grid sweeps/batches --run-all --results-root '$out/results' \
               && $py benchmarks/batches.py '$out/results/batches' --by model.block_dropout --figure '$out/batches-ssim.png'" ;;
               # issue 23's map: 170 cells, 2.9 M image-iterations of ResNet-18/ViT; ~0.5-1 GPU-h projected on an
               # H200 from the rates above (docs/batches.md), not measured
    eager) timed eager $py benchmarks/eager_programs.py --device cuda --compiled --ks 1,8,64 --iterations 300 ;;  # ~5 min
    *) echo "unknown section '$s'; choose from: paper-lite bench compile-cache variants refill fidelity defenses fedavg batches eager" >&2; exit 2 ;;
  esac
done
