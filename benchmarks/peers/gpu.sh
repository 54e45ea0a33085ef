#!/usr/bin/env bash
# The peer table on a lent GPU (issue 15, item 5), as one command for the device tool:
#   here:   bash benchmarks/peers/gpu_wheels.sh
#   device: run(command="bash benchmarks/peers/gpu.sh", carry=[".whl"], timeout_s=600)
# Installs the carried peers into /tmp/site (learn2learn built from its prepared source; left out if
# that fails, and recorded as "not installed"), then `run.py --device cuda`: every case without the
# compiled implementations (about 5 minutes at most), then MAML with one step with them (Inductor and
# Triton compile for a minute or two), each under its own time limit so that the first table comes
# back even if the second runs out. Results in $OUT (the device tool's folder; /tmp/peers_gpu
# elsewhere): peers_gpu.json, peers_gpu_compiled.json, log.txt, nvidia-smi.txt. Then, here, copy them
# to benchmarks/results/ and record them beside the CPU table in benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
[ -d .whl ] || { echo "error: no .whl here: run bash benchmarks/peers/gpu_wheels.sh first and carry .whl" >&2; exit 2; }
out=${OUT:-/tmp/peers_gpu}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi"
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
(cd .whl/l2l/learn2learn-0.2.0 && python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --no-cache-dir --target "$site" .) || echo "learn2learn did not build: left out"
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
python3 -c "import torch, metaloss; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
skip=()
python3 -c "import learn2learn" 2>/dev/null || skip+=(learn2learn)
timeout 330 python3 benchmarks/peers/run.py --device cuda --repeats 10 --warmup 2 \
    --skip metaloss_compiled metaloss_threads_compiled "${skip[@]}" --out "$out/peers_gpu.json" \
    || echo "the uncompiled table stopped (exit $?)"
timeout 200 python3 benchmarks/peers/run.py --device cuda --repeats 10 --warmup 2 --cases maml_1step \
    --skip metaloss_batched "${skip[@]}" --out "$out/peers_gpu_compiled.json" \
    || echo "the compiled MAML table stopped (exit $?)"
ls -la "$out"
