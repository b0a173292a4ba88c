"""Known ways a run dies, hangs or leaks, each turned into one sentence that says what to change.

Before: the launcher's SIGTERM is handled like Ctrl-C, DeepSpeed build locks left by a killed
compile (which would hang the run silently) are removed, and the libraries' lines that read like
faults but are not are silenced. During: Ctrl-C, CUDA out of memory, a full disk and FP16's
loss-scale collapse stop with the fix and the newest checkpoint. After: all processes leave together, and end.
"""

import contextlib
import errno
import importlib
import io
import logging
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from pathlib import Path


def prepare():
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the launcher's "stop": like Ctrl-C
    clear_stale_build_locks()
    silence_false_alarms()


def silence_false_alarms():
    """Lines every run printed that read like faults but are not, each silenced at its source."""
    # Accelerate warns "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,
    # DeepSpeed config has N. Using DeepSpeed's value.": with DeepSpeed the Trainer leaves
    # accumulation to DeepSpeed, whose N is TRAINING["gradient_accumulation_steps"] (via "auto").
    logging.getLogger("accelerate.accelerator").addFilter(not_an_accumulation_mismatch)
    # PyTorch's deprecation notices for calls inside DeepSpeed's ZeRO-3: DeepSpeed's to change.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|"
                            r"reduce_scatter_tensor)` is deprecated", FutureWarning)
    # With one CUDA GPU, PyTorch's barrier() warns "using the device under current context": that
    # device is the only one. With several, DeepSpeed binds each process's device (device_id).
    warnings.filterwarnings("ignore", r"barrier\(\): using the device under current context",
                            UserWarning)
    # On CPUs DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
    # successfully" on every run, though it only loads the op it compiled once.
    comm = importlib.import_module("deepspeed.comm.torch")  # (deepspeed.comm.torch reads as torch)
    if not getattr(comm.build_shm_op, "quiet", False):
        comm.build_shm_op = quiet(comm.build_shm_op)
    announce_op_builds()


def free_port():
    """A port nobody listens on, for the launcher's --master_port: DeepSpeed's default 29500
    collides when two runs overlap (the second dies with "address already in use")."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def not_an_accumulation_mismatch(record):
    return "Gradient accumulation steps mismatch" not in record.getMessage()


def quiet(function):
    """function, with what it prints to stdout dropped."""
    def quietly(*args, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):
            return function(*args, **kwargs)
    quietly.quiet = True
    return quietly


def announce_op_builds():
    """DeepSpeed compiles each of its ops on first use, in silence: about a minute for CPU Adam or
    the CPU communication op, three for async I/O (SETUP "disk"), on 2 cores. Said beforehand."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    jit_load = OpBuilder.jit_load
    if getattr(jit_load, "announced", False):
        return

    def announced_jit_load(builder, verbose=True):
        if not compiled(builder.name) and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"Compiling DeepSpeed's {builder.name} op for its first use (once, 1-3 minutes "
                  f"on 2 cores; cached in {extensions_root()}) ...", file=sys.stderr, flush=True)
        return jit_load(builder, verbose)

    announced_jit_load.announced = True
    OpBuilder.jit_load = announced_jit_load


def extensions_root():
    """Where PyTorch caches the ops DeepSpeed compiles (make-venv.sh sets TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def compiled(op_name):
    """Whether an op's library is in the cache (the default cache has a folder per accelerator)."""
    root = extensions_root()
    return any(root.glob(f"{op_name}/{op_name}.so")) or any(root.glob(f"*/{op_name}/{op_name}.so"))


def clear_stale_build_locks(max_age_s=600):
    """DeepSpeed compiles its ops on first use; a build killed half-way leaves a 'lock' file and
    every later run then waits on it forever, silently. A build takes about a minute: older locks
    are stale."""
    for lock in list(extensions_root().glob("*/lock")) + list(extensions_root().glob("*/*/lock")):
        if time.time() - lock.stat().st_mtime > max_age_s:
            print(f"Removing {lock}: left by a DeepSpeed op build that was interrupted (it would "
                  f"hang this run).")
            lock.unlink(missing_ok=True)


@contextlib.contextmanager
def model_within_reach(name, script="finetune.py", what="model", setting="MODEL['name']"):
    """The model's config and tokenizer come from the Hugging Face hub (downloaded once, then cached)
    or from a local folder; when neither answers, one sentence says so instead of a long traceback.
    A hub that does not answer one request within seconds puts huggingface_hub offline first: a
    cached model then loads at once, and one not cached fails at once, not after its 5 retries
    ("Retrying in 8s [Retry 5/5]", ~25 s a file). token_split.py: its tokenizer, its setting."""
    from huggingface_hub import constants

    folder = Path(name).expanduser().exists()
    if not folder and not constants.HF_HUB_OFFLINE and not hub_answers():
        go_offline()
    try:
        yield
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        if name.startswith(("/", ".", "~")) and not folder:
            reason = "no such folder"
        raise SystemExit(
            f"{script}: cannot load the {what} '{name}' ({reason}). It comes from the Hugging Face "
            f"hub (downloaded once, which needs the network, then cached) or from a local folder: "
            f"without network, copy the model's folder to this machine and set {setting} in "
            f"{script} to that folder.") from None


def hub_answers(timeout_s=5):
    """Whether the hub (HF_ENDPOINT's, through the proxy the environment names) answers one
    request, without huggingface_hub's retries."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s)
    except httpx2.TransportError:  # no name resolution, no route, a timeout, a refusing proxy
        return False
    return True


def go_offline():
    """huggingface_hub's offline mode (HF_HUB_OFFLINE=1), set for this process and those it starts.
    huggingface_hub reads the variable once, when it is imported, into the value its
    is_offline_mode() returns, which transformers asks before every download: that value is set."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def explained(trainer, checkpoint_dir, training, largest_batch):
    """Training inside this block ends, on a known failure, with what happened and how to go on."""
    import torch

    batch = training["per_device_train_batch_size"]
    try:
        yield
    except KeyboardInterrupt:
        stop("stopped by Ctrl-C (or the launcher)", trainer, checkpoint_dir)
    except torch.OutOfMemoryError:
        fits = f" (measured on GPT-J-6B: {largest_batch} fits this card)" if largest_batch else ""
        stop(f"CUDA ran out of GPU memory at per_device_train_batch_size={batch}. Lower it{fits} "
             f"and raise gradient_accumulation_steps to keep the full batch", trainer,
             checkpoint_dir)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        stop(f"the disk filled up while writing a checkpoint to {checkpoint_dir}/. Free some space "
             f"(or lower CHECKPOINTS['keep']) and run it again", trainer, checkpoint_dir)
    except Exception as error:
        if "loss scale already at minimum" not in str(error):
            raise
        stop("FP16 overflowed on every step until DeepSpeed's loss scale hit its minimum (the loss "
             "became inf/nan). Lower the learning rate (TRAINING's, LoRA: LORA_TRAINING's), or set "
             "TRAINING['bf16'] = True on a card with bf16", trainer, checkpoint_dir)


def stop(reason, trainer, checkpoint_dir):
    """End a failed run with what happened, where the newest checkpoint is, and how to go on."""
    # a second Ctrl-C, or the launcher's SIGTERM, must not cut this short
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import checkpoints  # here, not at the top: token_split.py uses this module without the Trainer

    newest = checkpoints.complete_checkpoints(checkpoint_dir)
    where = (f"The newest complete checkpoint is {newest[-1]}: run `deepspeed finetune.py` again "
             f"to continue from it (delete {checkpoint_dir}/ to start over)." if newest else
             "There is no checkpoint yet: the next run starts from the beginning.")
    message = (f"\nfinetune.py: {reason}. Stopped at optimizer step {trainer.state.global_step}. "
               f"{where}")
    raise SystemExit(message if trainer.is_local_process_zero() else 1)  # said once, by the first


@contextlib.contextmanager
def disk_full_while_saving(trainer, partial, files):
    """A disk that fills up while out.partial/ is written: what was written goes, old out/ stays."""
    out_dir, checkpoint_dir = files["out_dir"], files["checkpoint_dir"]
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        stop(f"the disk filled up while writing the model to {partial}/ (the previous {out_dir}/, "
             f"if any, is untouched). Free some space and run it again", trainer, checkpoint_dir)


def leave_together():
    """Every process waits until the first has written out/, then the process group is closed and
    the process ends here, without Python's teardown. One that exits while another still talks to it
    can abort; so can the collective library's own threads when the interpreter is torn down under
    them ("terminate called without an active exception", exit -6, after the model was saved: seen
    on a GPU and in a two-node CPU test). Python's multiprocessing ends its workers the same way."""
    import torch.distributed as distributed

    if not distributed.is_initialized():  # no process group: nothing to wait for or to close
        return
    distributed.barrier()
    distributed.destroy_process_group()
    # On CPUs DeepSpeed's shared-memory allreduce leaves a 66 MB buffer in /dev/shm (RAM) per
    # process and never removes it; each run on another port would add one more.
    buffer = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_"
                                 f"{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_"
                                 f"{os.environ.get('RANK')}")
    buffer.unlink(missing_ok=True)
    logging.shutdown()  # every file written was closed by now; only the streams hold output
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
