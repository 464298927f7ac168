#!/bin/sh
# Installs torch before the lock (requirements/lock*.txt keeps torch out of its resolution).
# usage: install-torch.sh PYTHON TORCH_SPEC
#   TORCH_SPEC empty: keep whatever torch the environment has (a GPU box with its own CUDA torch).
#   a box with CUDA (nvidia-smi or /proc/driver/nvidia): the spec from the default index.
#   a box without: the CPU build, from PyTorch's CPU index where it answers within a few
#   seconds, else from the default index with a warning (on Linux that is the multi-GB CUDA
#   build unless pip finds a local CPU wheel, as the test machines have in /opt/wheels).
set -eu
PY="$1"
SPEC="${2:-}"
# Byte code is compiled on first import instead: compiling all of torch at install doubles its
# install time.
PIP_FLAGS="--quiet --no-compile"
CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
if [ -z "$SPEC" ]; then
  echo "torch: TORCH_SPEC is empty, keeping the installed torch"
  exit 0
fi
# Already there (the venv is being refreshed): nothing to fetch.
if "$PY" - "$SPEC" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh venv: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
req = Requirement(sys.argv[1])
sys.exit(0 if req.specifier.contains(version(req.name).split("+")[0], prereleases=True) else 1)
PYEOF
then
  echo "torch: $SPEC already installed"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ]; then
  echo "torch: CUDA found, installing $SPEC from the default index"
  exec "$PY" -m pip install $PIP_FLAGS "$SPEC"
fi
if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=4)" \
    "$CPU_INDEX" >/dev/null 2>&1; then
  echo "torch: no CUDA, installing the CPU build of $SPEC from $CPU_INDEX"
  exec "$PY" -m pip install $PIP_FLAGS --index-url "$CPU_INDEX" "$SPEC"
fi
echo "torch: WARNING: no CUDA and $CPU_INDEX is unreachable; installing $SPEC from the default" \
     "index, which is the CUDA build on Linux unless a local CPU wheel is found" >&2
"$PY" -m pip install $PIP_FLAGS "$SPEC"
"$PY" -W ignore -c "import torch; print('torch:', torch.__version__, 'CUDA', torch.version.cuda or 'none (CPU build)')"
