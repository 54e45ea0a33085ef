#!/usr/bin/env bash
# NPBML's ablation (Raymond et al. 2024, "Meta-Learning Neural Procedural Biases", its table of
# components) on the Omniglot minimal sets, 5-way 1-shot (experiment=omniglot_minimal_5way):
# MAML, +optimizer (learned warp preconditioner), +loss (task-adaptive loss without FiLM), both,
# and full NPBML (+FiLM). Every run has the same budget (META_STEPS meta-steps, default 400: NPBML
# costs about 4x MAML per step here), PARALLEL (default 2) runs at a time with one torch thread each; run directories
# under benchmarks/runs/npbml_ablation_<META_STEPS>_* (not committed). Then
# `python benchmarks/summarize_npbml_ablation.py --meta-steps N` writes
# benchmarks/results/npbml_ablation_<N>.{json,md,png}.
#
#   bash benchmarks/npbml_ablation.sh                 # all five
#   META_STEPS=2000 bash benchmarks/npbml_ablation.sh maml npbml   # a selection, a longer budget
set -euo pipefail
cd "$(dirname "$0")/.."
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
  runs=(npbml npbml_nofilm npbml_loss npbml_optimizer maml)
fi
steps=${META_STEPS:-400}
mkdir -p benchmarks/runs
run_one() {
  local name=$1 dir="benchmarks/runs/npbml_ablation_${steps}_$1"
  local extra=()
  case "$name" in
    npbml_nofilm) extra=(algorithm=npbml inner_loss.film=false) ;;
    *) extra=("algorithm=${name}") ;;
  esac
  python scripts/meta_train.py experiment=omniglot_minimal_5way "${extra[@]}" "train.meta_steps=${steps}" \
    threads=1 progress=false "hydra.run.dir=${dir}" > "${dir}.log" 2>&1
}
for run in "${runs[@]}"; do  # two at a time: the next starts as soon as one ends
  while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-2}" ]; do wait -n; done
  run_one "$run" &
done
wait
