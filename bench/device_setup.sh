# Sourced at the start of a device run: the GPU machine's image has torch but not our pinned
# transformers/deepspeed/datasets, so they come as wheels in .whl/ (git-ignored, see bench/RESULTS.md).
set -e
[ -d /tmp/site/deepspeed ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions PYTHONUNBUFFERED=1
# DeepSpeed's op builder cannot parse the image's "9.0a" entries (ValueError: invalid literal for int(): '0a').
export TORCH_CUDA_ARCH_LIST="9.0"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# DeepSpeed's async I/O op (OFFLOAD "nvme") needs libaio's header and library; unpacked beside, not into, /.
if [ ! -e /usr/include/libaio.h ] && [ -d .whl/debs ]; then
  for deb in .whl/debs/libaio*.deb; do dpkg -x "$deb" /tmp/libaio; done
  export CPATH=/tmp/libaio/usr/include LIBRARY_PATH=/tmp/libaio/usr/lib/x86_64-linux-gnu LD_LIBRARY_PATH=/tmp/libaio/usr/lib/x86_64-linux-gnu
fi
[ -d /tmp/torch_extensions/cpu_adam ] || python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" > /tmp/cpu_adam_build.log 2>&1
set +e
