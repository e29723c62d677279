#!/usr/bin/env bash
# The GPU measurements of benchmarks/speed.py, prepared to run on a GPU machine
# lent through the device tool, from the repository's root, with the wheels of wheels.sh:
#
#   run(command="bash benchmarks/gpu/run.sh generation", carry=[".whl"], timeout_s=400)
#   run(command="bash benchmarks/gpu/run.sh scale", carry=[".whl"], timeout_s=600)
#
# (a call runs 10 minutes at most: scale in a call of its own, made while the machine is
# still warm)
# Parts, in the order given (times on an H100, machine start not included):
#   generation  speed.py --parts generation training tricks: 10,000 cells generated,
#               the training steps of both stages and of scVI, the speed tricks (about 3 min)
#   full        speed.py --parts training --full-training: also the default trainings of
#               LapDDPM and scVI end to end (about 5 min)
#   scale       speed.py --parts scale --sizes 10000 1000000 --backed: the atlas sizes read
#               from a backed .h5ad (about 7 min)
# The results come back in $OUT: speed_cuda.json and .md (the repository's, with the parts
# run replaced) and log.txt. Copy the first two into benchmarks/results/ before the next
# call, which starts from the repository's.
#
# The image has python3 with torch, numpy, scipy, pandas, numba, lightning and
# torch-geometric; what it lacks comes from .whl (requirements.txt), installed without
# dependencies into /tmp/site. For a check of this script without a GPU: SKIP_WHEELS=1
# PYTHON=.venv/bin/python DEVICE=cpu QUICK=1 (speed.py --quick writes nothing).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/scldiff_gpu}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
[ $# -gt 0 ] || { echo "usage: $0 generation|full|scale ..." >&2; exit 2; }
if [ -z "${SKIP_WHEELS:-}" ]; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/: run benchmarks/gpu/wheels.sh and carry .whl" >&2; exit 1; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
cp benchmarks/results/speed_cuda.json benchmarks/results/speed_cuda.md "$OUT"/ 2>/dev/null
DEVICE=$DEVICE "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/log.txt" || exit 1
import os
import torch, anndata, scanpy, scvi, scldiff
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "torch sees no GPU"
    print(torch.cuda.get_device_name(0), end=", ")
print(f"torch {torch.__version__}, scvi-tools {scvi.__version__}, anndata {anndata.__version__}, "
      f"scanpy {scanpy.__version__}, {os.cpu_count()} CPUs")
PY
status=0
for part in "$@"; do
  case $part in
    generation) args=(--parts generation training tricks) ;;
    full) args=(--parts training --full-training) ;;
    scale) args=(--parts scale --sizes 10000 1000000 --backed) ;;
    *) echo "unknown part: $part (generation, full or scale)" >&2; exit 2 ;;
  esac
  echo "== $part, $(date +%T)" | tee -a "$OUT/log.txt"
  "$PYTHON" benchmarks/speed.py --device "$DEVICE" "${args[@]}" --output "$OUT" \
    ${QUICK:+--quick} 2>&1 | tee -a "$OUT/log.txt" || status=1
done
echo "== done, $(date +%T)" | tee -a "$OUT/log.txt"
exit $status
