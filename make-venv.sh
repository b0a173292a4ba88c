#!/usr/bin/env bash
# Makes venv/ from scratch and installs the pinned requirements, then compiles DeepSpeed's CPU Adam
# op (about a minute), which every run uses, so that no run waits for it. (Figures: README.)
#   ./make-venv.sh && . venv/bin/activate
# TORCH_PIP_ARGS is passed to the torch install, e.g. a CPU-only index on a machine without a GPU:
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" ./make-venv.sh
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
rm -rf venv
"$PYTHON" -m venv venv
. venv/bin/activate

# torch first, on its own, so that the choice of build (CUDA or CPU) is made here, not by a dependency.
# --no-compile: Python compiles a module when it is first imported, not all 14,000 at set-up (~35 s
# and ~340 MB less; the first run of the demo compiles the ones it imports, a few seconds).
pip install --no-compile ${TORCH_PIP_ARGS:-} "torch==$(grep -Po '^torch==\K\S+' requirements.txt)"
pip install --no-compile -r requirements.txt

# DeepSpeed compiles its ops on first use and caches them in TORCH_EXTENSIONS_DIR. The default cache
# (~/.cache/torch_extensions) is shared by every venv on the machine and goes stale when one of them
# reinstalls DeepSpeed, so this venv gets its own, set whenever the venv is activated.
echo 'export TORCH_EXTENSIONS_DIR="$VIRTUAL_ENV/torch_extensions"' >> venv/bin/activate
export TORCH_EXTENSIONS_DIR="$PWD/venv/torch_extensions"
echo "Compiling DeepSpeed's CPU Adam op (once, about a minute) ..."
python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"

# SETUP = "disk" (finetune.py) needs DeepSpeed's async I/O op, which DeepSpeed compiles from libaio on its
# first use (about 3 minutes on 2 cores, once; not here, for the many who never use it). Without the
# system's libaio (apt install libaio-dev), Debian/Ubuntu's packages are unpacked into the venv (no root).
if ! echo '#include <libaio.h>' | cc -E - > /dev/null 2>&1; then
  echo "Fetching libaio into venv/libaio (for SETUP 'disk') ..."
  mkdir -p venv/libaio/lists/partial
  if apt-get -qq -o Dir::State::Lists="$PWD/venv/libaio/lists" update > /dev/null 2>&1 &&
     (cd venv/libaio && { apt-get -qq -o Dir::State::Lists="$PWD/lists" download libaio-dev libaio1t64 ||
                          apt-get -qq -o Dir::State::Lists="$PWD/lists" download libaio-dev libaio1; }) > /dev/null 2>&1; then
    for deb in venv/libaio/*.deb; do dpkg -x "$deb" venv/libaio; done
    rm -rf venv/libaio/lists venv/libaio/*.deb  # the package lists (~20 MB) and packages, unpacked
    lib=$(dirname "$(find "$PWD/venv/libaio/usr/lib" -name 'libaio.so*' | head -1)")
    echo "export CPATH=\"$PWD/venv/libaio/usr/include\" LIBRARY_PATH=\"$lib\" LD_LIBRARY_PATH=\"$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"" >> venv/bin/activate
    . venv/bin/activate
  else
    echo "Could not fetch libaio: SETUP 'disk' will not work until it is installed (apt install libaio-dev)."
  fi
fi
echo "Done. Activate with:  . venv/bin/activate"
