#!/usr/bin/env bash
# Omniglot minimal-set reproduction: every (setting, algorithm) pair, two runs at a time with one
# torch thread each (on 2 cores this beats one run with two threads). Each run writes its Hydra run
# directory under benchmarks/runs/ (not committed) and its log beside it; then
# `python benchmarks/summarize_omniglot_minimal.py` writes benchmarks/results/omniglot_minimal.{json,md}.
#
#   bash benchmarks/omniglot_minimal.sh                       # all 8 runs of the 4 x 2 table
#   bash benchmarks/omniglot_minimal.sh 20way:maml 5way:anil  # a selection
#   bash benchmarks/omniglot_minimal.sh 20way:anil_5steps 20way:maml_3600steps   # the variants
set -euo pipefail
cd "$(dirname "$0")/.."
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  runs=(20way:maml 20way:metasgd 20way:anil 20way:fomaml 5way:maml 5way:metasgd 5way:anil 5way:fomaml)
fi
mkdir -p benchmarks/runs
run_one() {
  local setting=${1%%:*} name=${1##*:}
  local dir="benchmarks/runs/omniglot_minimal_${setting}_${name}"
  local extra=()
  case "$name" in  # variants: an algorithm with other settings
    anil_5steps) extra=(algorithm=anil problem.inner_steps=5) ;;
    maml_3600steps) extra=(algorithm=maml train.meta_steps=3600) ;;
    *) extra=("algorithm=${name}") ;;
  esac
  python scripts/meta_train.py "experiment=omniglot_minimal_${setting}" "${extra[@]}" \
    threads=1 progress=false "hydra.run.dir=${dir}" > "${dir}.log" 2>&1
}
i=0
for run in "${runs[@]}"; do
  run_one "$run" &
  i=$((i + 1))
  if [ $((i % 2)) -eq 0 ]; then wait; fi
done
wait
