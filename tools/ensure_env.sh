#!/usr/bin/env bash
# Installs what dials_cnn needs into the Python that runs DIALS (Debian's /usr/bin/python3),
# only where it is missing, so that a second run costs about a second.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
PY=/usr/bin/python3
PIP="$PY -m pip install --break-system-packages --disable-pip-version-check -q"
export DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1

apt_pkgs="dials python3-dials python3-pytest python3-pip xvfb xauth python3-mpi4py openmpi-bin gcc libc6-dev"
missing=""
for p in $apt_pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "[ensure_env] apt-get install$missing"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# PyTorch 2.13 CPU from pip (Debian's python3-torch is 1.13, too old).
if ! $PY -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13') else 1)" 2>/dev/null; then
  echo "[ensure_env] pip install torch==2.13.0 (CPU)"
  $PIP "torch==2.13.0"
fi

# The project itself, editable, into DIALS' Python: its dxtbx.format entry points and
# dials.cnn_* scripts are then seen by the stock /usr/bin/dials.* commands.
stamp="$here/.make/installed-$(md5sum "$here/setup.py" | cut -c1-12)"
# Checked from / so that the working tree itself is not on sys.path: the installed mapping must point here.
if [ ! -f "$stamp" ] || ! (cd / && $PY -c "import dials_cnn.command_line as c, os, sys; sys.exit(0 if os.path.realpath(c.__path__[0]) == os.path.realpath('$here/command_line') else 1)") 2>/dev/null; then
  echo "[ensure_env] pip install -e $here"
  (cd "$here" && $PIP --no-build-isolation --no-deps --use-pep517 -e . >/dev/null)
  mkdir -p "$here/.make" && rm -f "$here"/.make/installed-* && touch "$stamp"
fi

# The compiled per-pixel passes (dials_cnn/_native.c, loaded with ctypes; without them numpy and torch do the
# same 1.7x more slowly). Portable flags: the library may be carried to another machine.
lib="$here/dials_cnn/_native.so"
if [ ! -f "$lib" ] || [ "$here/dials_cnn/_native.c" -nt "$lib" ]; then
  echo "[ensure_env] gcc dials_cnn/_native.c"
  if gcc -O3 -fno-math-errno -fPIC -shared -o "$lib.tmp" "$here/dials_cnn/_native.c" -lm; then
    mv "$lib.tmp" "$lib"
  else
    echo "[ensure_env] could not compile dials_cnn/_native.c: numpy and torch do its work, more slowly"
  fi
fi
