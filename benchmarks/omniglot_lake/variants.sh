#!/usr/bin/env bash
# Closing the gap to Lake's Omniglot one-shot benchmark on the minimal sets (issue 14): each variant
# meta-trains 20-way 1-shot MAML on six background alphabets (Greek, Japanese, Korean, Latin, Sanskrit,
# Tagalog; rotations as new classes), is validated on within-alphabet 20-way episodes of Balinese
# (24 characters) and meta-tested on within-alphabet episodes of Early_Aramaic (22 characters), the
# proxy of the official runs (benchmarks/README.md). Two runs at a time, one torch thread each; run
# directories under benchmarks/runs/omniglot_lake/ (not committed); then
# `python benchmarks/omniglot_lake/summarize.py` writes benchmarks/results/omniglot_lake_variants.{json,md}.
#
#   bash benchmarks/omniglot_lake/variants.sh maxpool maxpool_affine
#   STEPS=600 VALIDATE=200 bash benchmarks/omniglot_lake/variants.sh maxpool maxpool_within
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${STEPS:-1000} validate=${VALIDATE:-250}
common=(experiment=omniglot_minimal_20way "task.train_alphabets=[Greek,'Japanese_(katakana)',Korean,Latin,Sanskrit,Tagalog]"
  "task.val_alphabets=[Balinese]" "task.test_alphabets=[Early_Aramaic]" task.within_alphabet=true
  "train.meta_steps=${steps}" "train.validate_every=${validate}" train.val_tasks=100 test.num_tasks=300 "test.steps=[1,10]"
  threads=1 progress=false)
maxpool=(model.pool=max model.global_pool=false)
affine="task.affine={degrees:10,shear:10,scale:0.1,translate:0.1}"
mkdir -p benchmarks/runs/omniglot_lake
run_one() {
  local name=$1 extra=()
  case "$name" in
    strided) extra=() ;;                                      # the kept checkpoint's architecture
    maxpool) extra=("${maxpool[@]}") ;;                       # 3x3 conv + BN + ReLU + 2x2 max-pool
    maxpool_affine) extra=("${maxpool[@]}" "$affine") ;;      # small affine transforms of training images
    maxpool_within) extra=("${maxpool[@]}" task.train_within_alphabet=true) ;;  # training episodes from one alphabet
    maxpool_lslr) extra=("${maxpool[@]}" inner_opt=lslr) ;;   # MAML++ learned per-layer per-step lr
    maxpool_lslr_within) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true) ;;  # both
    maxpool_metasgd) extra=("${maxpool[@]}" algorithm=metasgd) ;;
    maxpool_32f) extra=("${maxpool[@]}" model.filters=32) ;;
    maxpool_2steps) extra=("${maxpool[@]}" problem.inner_steps=2) ;;
    maxpool_lslr_within_2steps) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true problem.inner_steps=2) ;;
    maxpool_metasgd_within) extra=("${maxpool[@]}" algorithm=metasgd task.train_within_alphabet=true) ;;  # Meta-SGD's per-weight rates
    maxpool_lslr_within_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true seed=1) ;;  # seed spread
    maxpool_lslr_within_seed2) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true seed=2) ;;
    maxpool_lslr_within_32f) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true model.filters=32) ;;  # MAML's mini-ImageNet width
    maxpool_lslr_within_32f_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true model.filters=32 seed=1) ;;
    # 32 filters for the time of 64 filters' 600 steps: run with STEPS=1320 VALIDATE=440
    maxpool_lslr_within_32f_1320steps) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true model.filters=32) ;;
    # the final settings for twice the meta-steps: run with STEPS=1200 VALIDATE=200
    maxpool_lslr_within_1200steps) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true) ;;
    maxpool_lslr_within_1200steps_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true seed=1) ;;
    # MAML++'s per-step BatchNorm weights and biases (BNWB): pair 0 for the support step, pair 1 for the query
    maxpool_lslr_within_bnwb) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true model.norm=batch_per_step model.norm_steps=2) ;;
    maxpool_lslr_within_bnwb_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true model.norm=batch_per_step model.norm_steps=2 seed=1) ;;
    maxpool_lslr_within_32f_1320steps_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true model.filters=32 seed=1) ;;
    # meta-batch and query count on the final settings (MAML++ uses meta-batch 16 for 20-way Omniglot)
    maxpool_lslr_within_mb16) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true train.meta_batch=16) ;;
    maxpool_lslr_within_q15) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true task.q_query=15) ;;
    # the other algorithms on the final settings: first-order MAML, ANIL (the head adapts, the body is reused)
    maxpool_lslr_within_fomaml) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true algorithm=fomaml) ;;
    maxpool_lslr_within_anil) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true algorithm=anil) ;;
    # compiled tasks (hypergrad.compile=true) on the final settings, run beside maxpool_lslr_within_rerun
    # (the same settings uncompiled) for a side-by-side wall time on this job
    maxpool_lslr_within_compiled) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true hypergrad.compile=true) ;;
    maxpool_lslr_within_rerun) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true) ;;
    # second seeds of single-seed variants: Meta-SGD with within-alphabet training, within-alphabet training alone
    maxpool_metasgd_within_seed1) extra=("${maxpool[@]}" algorithm=metasgd task.train_within_alphabet=true seed=1) ;;
    maxpool_within_seed1) extra=("${maxpool[@]}" task.train_within_alphabet=true seed=1) ;;
    # second seeds of the mixed-alphabet baselines: max-pool alone, and with LSLR (is within-alphabet training worth it?)
    maxpool_seed1) extra=("${maxpool[@]}" seed=1) ;;
    maxpool_lslr_seed1) extra=("${maxpool[@]}" inner_opt=lslr seed=1) ;;
    # Kao et al. (2022)'s zeroing trick on the final settings: the head starts every task at zero (not phi)
    maxpool_lslr_within_zerohead) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true "init.zeroed=[head]") ;;
    maxpool_lslr_within_zerohead_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true "init.zeroed=[head]" seed=1) ;;
    # ... with two training inner steps (one step cannot adapt the body from W = 0; Kao et al. train with several)
    maxpool_lslr_within_zerohead_2steps) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true "init.zeroed=[head]" problem.inner_steps=2) ;;
    maxpool_lslr_within_zerohead_2steps_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true "init.zeroed=[head]" problem.inner_steps=2 seed=1) ;;
    # Proto-MAML (Triantafillou et al. 2020) on the final settings: the head starts as the support set's prototype classifier
    maxpool_lslr_within_protohead) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true init=proto_head) ;;
    maxpool_lslr_within_protohead_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true init=proto_head seed=1) ;;
    maxpool_lslr_within_protohead_seed2) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true init=proto_head seed=2) ;;
    maxpool_lslr_within_seed3) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true seed=3) ;;  # its fourth seed, beside it
    # a larger input (42 x 42 instead of 28 x 28; Lake's images are 105 x 105): finer strokes reach the Conv-4
    maxpool_lslr_within_42px) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true task.image_size=42 model.image_size=42) ;;
    # half the training characters (two complementary halves of the six alphabets; within-alphabet training draws 106
    # and 73 of their characters, Tagalog's 17 being too few for a 20-way episode):
    # how the proxy error scales with the size of the training set (the minimal sets hold a quarter of the background set's)
    maxpool_lslr_within_3alphabets_a) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true "task.train_alphabets=[Greek,Korean,Sanskrit]") ;;
    maxpool_lslr_within_3alphabets_b) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true "task.train_alphabets=['Japanese_(katakana)',Latin,Tagalog]") ;;
    maxpool_lslr_within_3alphabets_a_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true "task.train_alphabets=[Greek,Korean,Sanskrit]" seed=1) ;;
    maxpool_lslr_within_3alphabets_b_seed1) extra=("${maxpool[@]}" inner_opt=lslr task.train_within_alphabet=true "task.train_alphabets=['Japanese_(katakana)',Latin,Tagalog]" seed=1) ;;
    *) echo "unknown variant $name" >&2; return 2 ;;
  esac
  local dir="benchmarks/runs/omniglot_lake/${name}"
  python scripts/meta_train.py "${common[@]}" "${extra[@]}" "hydra.run.dir=${dir}" > "${dir}.log" 2>&1
}
i=0
for name in "$@"; do
  run_one "$name" &
  i=$((i + 1))
  if [ $((i % 2)) -eq 0 ]; then wait; fi
done
wait
