#!/usr/bin/env bash
# Wheels the H200 image lacks for scripts/gpu_check.sh (only msgspec: the offline engine, the
# benches and the GPU tests import nothing else that is missing there), for Python 3.12, into
# .whl (ignored by git: `echo /.whl/ >> .git/info/exclude`). Then: device run with carry [".whl"].
set -euo pipefail
VERSION=$(python3 -c "import importlib.metadata as m; print(m.version('msgspec'))" 2>/dev/null || echo 0.19.0)
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "msgspec==$VERSION"
ls -l .whl
