#!/usr/bin/env bash
# Packages for the peer table on a lent GPU machine (issue 15), which reaches no package registry:
# run here, in the environment of install.sh (Cython 3), before benchmarks/peers/gpu.sh goes there with `carry: [".whl"]`.
#   bash benchmarks/peers/gpu_wheels.sh
# Writes .whl/ (ignored through .git/info/exclude; about 12 MB): the peers' wheels for the GPU image's
# Python 3.12 (higher 0.2.1, TorchOpt 0.7.3 and its optree and graphviz) and learn2learn 0.2.0's
# source made buildable there (learn2learn_source.sh; the image has a C compiler). The image already
# holds torch (CUDA), numpy, safetensors, tensorboard and tqdm, all metaloss needs to import.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import Cython" 2>/dev/null || { echo "error: needs Cython >= 3 in the active environment (install.sh)" >&2; exit 2; }
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "higher==0.2.1" "torchopt==0.7.3" "optree==0.20.0" "graphviz==0.21"
bash benchmarks/peers/learn2learn_source.sh .whl/l2l > /dev/null
rm -f .whl/l2l/learn2learn-0.2.0.tar.gz
du -sh .whl && ls .whl
