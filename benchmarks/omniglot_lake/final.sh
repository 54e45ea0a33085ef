#!/usr/bin/env bash
# The final Omniglot run for Lake's benchmark (issue 14): 20-way 1-shot MAML on every alphabet of the
# two minimal background sets (8 alphabets, 242 characters, rotations as new classes; no validation
# or test split: its proxy score is the same settings' within-alphabet validation error in
# variants.sh), max-pool Conv-4 with 64 filters, one inner step with MAML++'s learned per-layer
# per-step learning rates (LSLR, initialised at 0.1), training episodes drawn within one alphabet
# (the best variant of variants.sh: maxpool_lslr_within), meta-batch 8. Then
# `python benchmarks/omniglot_lake/summarize.py` strips its checkpoint (phi and the
# config) into benchmarks/checkpoints/omniglot_minimal_all_20way_maml_maxpool.pt. Evaluate it on the
# official runs (all_runs.zip, not in this project) with
#   python scripts/meta_test.py checkpoint=benchmarks/checkpoints/omniglot_minimal_all_20way_maml_maxpool.pt \
#     task=omniglot_lake task.root=<folder with all_runs.zip> test.steps=[10]
#
#   STEPS=1500 THREADS=1 bash benchmarks/omniglot_lake/final.sh
#
# Further Hydra overrides go after the script, with NAME for a run folder of its own, e.g. the
# prototype head measured beside the kept checkpoint on the official runs:
#   STEPS=2000 NAME=final_all_protohead bash benchmarks/omniglot_lake/final.sh init=proto_head
# (summarize.py keeps a run NAME=final_all_<suffix> as
# benchmarks/checkpoints/omniglot_minimal_all_20way_maml_maxpool_<suffix>.pt.)
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${STEPS:-1500} threads=${THREADS:-1} name=${NAME:-final_all}
dir=benchmarks/runs/omniglot_lake/${name}
mkdir -p benchmarks/runs/omniglot_lake
python scripts/meta_train.py experiment=omniglot_minimal_20way model.pool=max model.global_pool=false \
  inner_opt=lslr task.train_within_alphabet=true \
  "task.val_alphabets=[]" "task.test_alphabets=[]" train.validate_every=0 "train.meta_steps=${steps}" \
  train.checkpoint_every=100 "threads=${threads}" progress=false "hydra.run.dir=${dir}" "$@" > "${dir}.log" 2>&1
