#!/usr/bin/env bash
# Makes venv/ from scratch and installs the pinned requirements (~3 minutes, ~1.5 GB on CPU).
# Then compiles DeepSpeed's CPU Adam op (~1 minute) and async I/O op (~2 minutes) once, so no run waits for them.
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
pip install ${TORCH_PIP_ARGS:-} "torch==$(grep -Po '^torch==\K\S+' requirements.txt)"
pip install -r requirements.txt

# DeepSpeed compiles its ops on first use and caches them in TORCH_EXTENSIONS_DIR. The default cache
# (~/.cache/torch_extensions) is shared by every venv on the machine and goes stale when one of them
# reinstalls DeepSpeed, so this venv gets its own, set whenever the venv is activated.
echo 'export TORCH_EXTENSIONS_DIR="$VIRTUAL_ENV/torch_extensions"' >> venv/bin/activate
export TORCH_EXTENSIONS_DIR="$PWD/venv/torch_extensions"
echo "Compiling DeepSpeed's CPU Adam op (once, about a minute) ..."
python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"

# OFFLOAD["optimizer"] = "nvme" (finetune.py) needs DeepSpeed's async I/O op, which needs libaio. Without the
# system's (apt install libaio-dev), Debian/Ubuntu's packages are unpacked into the venv (no root needed).
if ! echo '#include <libaio.h>' | cc -E - > /dev/null 2>&1; then
  echo "Fetching libaio into venv/libaio (for OFFLOAD 'nvme') ..."
  mkdir -p venv/libaio/lists/partial
  if apt-get -qq -o Dir::State::Lists="$PWD/venv/libaio/lists" update > /dev/null 2>&1 &&
     (cd venv/libaio && { apt-get -qq -o Dir::State::Lists="$PWD/lists" download libaio-dev libaio1t64 ||
                          apt-get -qq -o Dir::State::Lists="$PWD/lists" download libaio-dev libaio1; }) > /dev/null 2>&1; then
    for deb in venv/libaio/*.deb; do dpkg -x "$deb" venv/libaio; done
    lib=$(dirname "$(find "$PWD/venv/libaio/usr/lib" -name 'libaio.so*' | head -1)")
    echo "export CPATH=\"$PWD/venv/libaio/usr/include\" LIBRARY_PATH=\"$lib\" LD_LIBRARY_PATH=\"$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"" >> venv/bin/activate
    . venv/bin/activate
  else
    echo "Could not fetch libaio: OFFLOAD 'nvme' will not work until it is installed (apt install libaio-dev)."
  fi
fi
if echo '#include <libaio.h>' | cc -E - > /dev/null 2>&1; then
  echo "Compiling DeepSpeed's async I/O op (once, about two minutes) ..."
  python -c "from deepspeed.ops.op_builder import AsyncIOBuilder; AsyncIOBuilder().load()"
fi
echo "Done. Activate with:  . venv/bin/activate"
