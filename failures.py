"""Known ways a run dies, hangs or leaks, each turned into one sentence that says what to change.

Before: the launcher's SIGTERM is handled like Ctrl-C, and DeepSpeed build locks left by a killed compile
(which would hang the run silently) are removed. During: Ctrl-C, CUDA out of memory, a full disk and FP16's
loss-scale collapse stop with the fix and the newest checkpoint. After: every process leaves together.
"""

import contextlib
import errno
import os
import shutil
import signal
import time
from pathlib import Path

import checkpoints


def prepare():
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the launcher's "stop" is handled like Ctrl-C
    clear_stale_build_locks()


def clear_stale_build_locks(max_age_s=600):
    """DeepSpeed compiles its ops on first use; a build killed half-way leaves a 'lock' file and every
    later run then waits on it forever, silently. A build takes about a minute: older locks are stale."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in list(root.glob("*/lock")) + list(root.glob("*/*/lock")):
        if time.time() - lock.stat().st_mtime > max_age_s:
            print(f"Removing {lock}: left by a DeepSpeed op build that was interrupted (it would hang this run).")
            lock.unlink(missing_ok=True)


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
        stop(f"CUDA ran out of GPU memory at per_device_train_batch_size={batch}. Lower it{fits} and raise "
             f"gradient_accumulation_steps to keep the full batch", trainer, checkpoint_dir)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        stop(f"the disk filled up while writing a checkpoint to {checkpoint_dir}/. Free some space "
             f"(or lower CHECKPOINTS['keep']) and run it again", trainer, checkpoint_dir)
    except Exception as error:
        if "loss scale already at minimum" not in str(error):
            raise
        stop("FP16 overflowed on every step until DeepSpeed's loss scale hit its minimum (the loss became inf/nan). "
             "Lower TRAINING['learning_rate'], or set TRAINING['bf16'] = True on a card with bf16",
             trainer, checkpoint_dir)


def stop(reason, trainer, checkpoint_dir):
    """End a failed run with what happened, where the newest checkpoint is, and how to go on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C, or the launcher's SIGTERM, must not cut this short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    newest = checkpoints.complete_checkpoints(checkpoint_dir)
    where = (f"The newest complete checkpoint is {newest[-1]}: run `deepspeed finetune.py` again to continue from it "
             f"(delete {checkpoint_dir}/ to start over)." if newest else
             "There is no checkpoint yet: the next run starts from the beginning.")
    message = f"\nfinetune.py: {reason}. Stopped at optimizer step {trainer.state.global_step}. {where}"
    raise SystemExit(message if trainer.is_local_process_zero() else 1)  # said once, by the first process


@contextlib.contextmanager
def disk_full_while_saving(trainer, partial, files):
    """A disk that fills up while out.partial/ is written: free what was written, keep the previous out/."""
    out_dir, checkpoint_dir = files["out_dir"], files["checkpoint_dir"]
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        stop(f"the disk filled up while writing the model to {partial}/ (the previous {out_dir}/, if any, is "
             f"untouched). Free some space and run it again", trainer, checkpoint_dir)


def leave_together():
    """Every process waits until the first has written out/, then the process group is closed: one that
    exits while another still talks to it can abort ("terminate called without an active exception")."""
    import torch.distributed as distributed

    if distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()
    # On CPUs DeepSpeed's shared-memory allreduce leaves a 66 MB buffer in /dev/shm (RAM) per process and never
    # removes it; each run on another port would add one more.
    buffer = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                                 f"{os.environ.get('MASTER_PORT')}_{os.environ.get('RANK')}")
    buffer.unlink(missing_ok=True)
