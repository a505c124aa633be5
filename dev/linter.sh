#!/bin/bash -e
# Format and lint the repository as detectron2's dev/linter.sh does: isort, black -l 100, then
# flake8, all with setup.cfg's settings. Run from anywhere; CI does not run it.
#
#   dev/linter.sh           format in place, then lint
#   dev/linter.sh --check   change nothing: fail if a file is not formatted or flake8 finds a problem
#
# Needs black, isort and flake8 in $PYTHON (default .venv/bin/python):
#   .venv/bin/python -m pip install black isort flake8
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
for tool in black isort flake8; do
  if ! "$PY" -m "$tool" --version > /dev/null 2>&1; then
    echo "dev/linter.sh: $tool is not installed in $PY; install it: $PY -m pip install $tool" >&2
    exit 1
  fi
done

CHECK=()
[[ "$1" == "--check" ]] && CHECK=(--check --diff)
echo "Running isort ..."
"$PY" -m isort "${CHECK[@]}" .
echo "Running black ..."
"$PY" -m black -l 100 "${CHECK[@]}" .
echo "Running flake8 ..."
"$PY" -m flake8 .
