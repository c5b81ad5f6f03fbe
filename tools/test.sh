#!/usr/bin/env bash
# Install the package with its dev tools, then run the notebooks' tests and the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev]"
python -m pip check
IN_TEST=1 nbdev_test --n_workers 2 --do_print --timing
python -m pytest -q tests/
