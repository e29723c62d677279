#!/usr/bin/env bash
# Download the wheels of requirements.txt for the GPU machines (CPython 3.12, x86-64 Linux)
# into .whl/ at the repository's root (ignored by git), about 46 MB: run where pip reaches
# PyPI, before benchmarks/gpu/run.sh is run on the GPU machine with .whl carried along.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
rm -rf .whl && mkdir -p .whl
# docrep is published as source only: build its (pure Python) wheel here
"$python" -m pip wheel -q --no-deps -w .whl "$(grep '^docrep==' benchmarks/gpu/requirements.txt)"
grep -v -e '^#' -e '^docrep==' -e '^$' benchmarks/gpu/requirements.txt \
  | xargs "$python" -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl
count=$(ls .whl/*.whl | wc -l)
expected=$(grep -c -v -e '^#' -e '^$' benchmarks/gpu/requirements.txt)
[ "$count" -eq "$expected" ] || { echo "expected $expected wheels in .whl, got $count" >&2; exit 1; }
du -sh .whl
