#!/usr/bin/env bash
# Create or refresh .venv with torch, detectron2 (sal-detectron2 wheel) and DetKD.
# Idempotent: a stamp file records what was installed; a second run installs nothing.
# Recipe: ../shared/ENVIRONMENT.md. Users with internet and a GPU may instead install the
# official detectron2 from source (see README.md) into their own environment.
set -euo pipefail
# pip warns about local find-links folders that do not exist on every machine: hide that noise.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
REQ_HASH=$(cat dev/bootstrap.sh setup.cfg 2>/dev/null | sha1sum | cut -c1-12)
STAMP="$VENV/.detkd-bootstrap-$REQ_HASH"
if [ -f "$STAMP" ]; then
  exit 0
fi
echo "[bootstrap] setting up $VENV (torch, detectron2, DetKD) ..."
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade "pip<26" >/dev/null 2>&1 || true
quiet "$VPY" -m pip install -q torch==2.14.1 torchvision==0.29.1
# detectron2: the PyPI wheel of the official code (CPython 3.10 tag; pure-Python use on 3.11).
if ! "$VPY" -c "import detectron2" >/dev/null 2>&1; then
  quiet "$VPY" -m pip install -q --no-deps --python-version 3.10 --only-binary=:all: \
      --target "$VENV/detectron2-pkg" sal-detectron2==0.7.2
  SITE=$("$VPY" -c 'import site; print(site.getsitepackages()[0])')
  echo "$(cd "$VENV" && pwd)/detectron2-pkg" > "$SITE/detectron2-pkg.pth"
fi
quiet "$VPY" -m pip install -q "numpy<2" pycocotools fvcore iopath "omegaconf>=2.1,<2.4" \
    "hydra-core>=1.1" termcolor yacs tabulate cloudpickle tqdm tensorboard matplotlib black \
    packaging Pillow "setuptools<81" opencv-python-headless scipy pytest pytest-timeout pytest-xdist
quiet "$VPY" -m pip install -q --no-deps --no-build-isolation -e .
"$VPY" -c "import torch, detectron2, detkd; print('[bootstrap] torch', torch.__version__, '| detectron2', detectron2.__version__, '| detkd ok')"
rm -f "$VENV"/.detkd-bootstrap-*
touch "$STAMP"
