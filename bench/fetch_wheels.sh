#!/usr/bin/env bash
# Fetch the wheels that a bare CUDA image lacks for `make gpu-check`, at the versions of constraints/lock.txt.
#
#   bash bench/fetch_wheels.sh [DEST]          # default DEST: .whl (ignored by git)
#   QLORA=0 bash bench/fetch_wheels.sh         # without bitsandbytes (43 MiB), for a second, QLoRA-only call
#
# The image (Python 3.12, x86_64) already holds torch 2.11, transformers 5.17, accelerate 1.15, peft, tokenizers,
# safetensors, numpy, pyarrow, pandas, matplotlib, tensorboard, rich, typer, pyyaml, jinja2, psutil, pytest,
# hypothesis, xxhash and fsspec; it lacks these, each fetched alone (--no-deps), so that
# `pip install --no-index --no-deps --target DIR DEST/*.whl` installs them there with nothing else:
#   sftkit     datasets (+ dill, multiprocess), pydantic (+ pydantic-core, annotated-types, typing-inspection)
#   the check  trl (vs_trl.py), bitsandbytes (the QLoRA stage)
# Then see bench/README.md ("GPU check on a bare CUDA image").
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$HERE/.whl}"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PIP="${PIP:-python3 -m pip}"
MISSING=(datasets dill multiprocess pydantic pydantic_core annotated-types typing-inspection trl)
[[ "${QLORA:-1}" == 1 ]] && MISSING+=(bitsandbytes)

pinned() {  # NAME==VERSION from the lock, which `make test` installs
    grep -i -m1 "^$1==" "$HERE/constraints/lock.txt" || { echo "$1 is not in constraints/lock.txt" >&2; exit 1; }
}
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
mkdir -p "$DEST"
for name in "${MISSING[@]}"; do
    $PIP download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
        "${platforms[@]}" -d "$DEST" "$(pinned "$name")"
done
ls -l "$DEST"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $NF; total += $5} END {printf "%8.2f MiB  in all\n", total / 1048576}'
