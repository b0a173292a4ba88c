"""Resume: the checkpoint a run continues from, the ones it refuses, the clean-up once out/ is done.

The Trainer writes checkpoint-<step>/ folders; trainer_state.json is the last file it writes into
one (after every process's DeepSpeed shards), so a folder without it was cut short and is never
used. run.json beside them records what must not change between a run and its resumption. On
several machines, all of them must write into one shared checkpoint_dir; checked before loading.
"""

import json
import os
import shutil
import socket
import uuid
from pathlib import Path

from transformers import TrainerCallback


class EveryStepsOnly(TrainerCallback):
    """Checkpoints every CHECKPOINTS["every_steps"] steps, not also at the last step: the Trainer's
    DefaultFlowCallback (transformers 5.24) saves at the last step whatever save_steps says, a whole
    checkpoint (~97 GB, ~40 s to write for GPT-J) that save() deletes once out/ is written. A run
    killed while out/ is written then resumes from the newest periodic checkpoint instead, and
    redoes up to every_steps - 1 steps."""

    def on_step_end(self, args, state, control, **kwargs):  # called after DefaultFlowCallback's
        last_step = state.global_step >= state.max_steps
        if last_step and args.save_strategy == "steps" and state.global_step % state.save_steps:
            control.should_save = False
        return control


def run_identity(facts, model_name, training, setup, lora, processes):
    """What must not change between a run and its resumption: the data, the model, the settings, and
    where the optimizer state lives (DeepSpeed's checkpoints differ between RAM, disk and GPU)."""
    return {"dataset": {key: facts[key] for key in ("created", "tokens", "block_size")},
            "model": model_name, "training": training, "lora": lora if setup["lora"] else None,
            "processes": processes, "optimizer_state": setup["optimizer_state"]}


def complete_checkpoints(checkpoint_dir):
    """checkpoint-<step> folders in step order that were written to the end."""
    folders = sorted(Path(checkpoint_dir).glob("checkpoint-*"),
                     key=lambda path: int(path.name.split("-")[1]))
    return [str(path) for path in folders if (path / "trainer_state.json").is_file()]


def shared_by_all_machines(checkpoint_dir, settings):
    """Several machines: each writes its ZeRO-3 part of every checkpoint into its checkpoint_dir,
    and only the first process completes, rotates and removes them, so a checkpoint_dir of each
    machine's own would leave the others' parts behind and a rerun could not resume. Checked before
    the model loads: the first process writes a file of a new name there (never looked up before,
    so no NFS cache can hide it) and every process looks for it. One machine: no check."""
    import torch.distributed as distributed

    if not settings["every_steps"] or not distributed.is_initialized():
        return
    node = os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK", "?"))  # deepspeed, torchrun
    machines = gather((f"{socket.gethostname()} (node {node})", uuid.uuid4().hex))
    if len({machine for machine, _ in machines}) == 1:
        return
    rank, count = distributed.get_rank(), len({machine for machine, _ in machines})
    marker = Path(checkpoint_dir) / f".shared-{machines[0][1]}"  # the first process's name for it
    if rank == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    gather(None)  # the file is there before anyone looks
    blind = sorted({machine for machine, seen in gather((machines[rank][0], marker.is_file()))
                    if not seen})
    if rank == 0:  # every process has looked
        marker.unlink()
    if blind:
        message = (f"finetune.py: {checkpoint_dir}/ is not one folder shared by all {count} "
                   f"machines ({', '.join(blind)} cannot see a file that {machines[0][0]} wrote "
                   f"there), so a killed run "
                   f"could not resume from its checkpoints: put checkpoint_dir on a disk all "
                   f"machines share (e.g. NFS) at the same path, or set "
                   f"CHECKPOINTS['every_steps'] = None (no checkpoints; a killed run starts over).")
        raise SystemExit(message if os.environ.get("LOCAL_RANK", "0") == "0" else 1)


def gather(value):
    """Every process's value, in process order (and a barrier: each waits for all)."""
    import torch.distributed as distributed

    values = [None] * distributed.get_world_size()
    distributed.all_gather_object(values, value)
    return values


def resume_point(checkpoint_dir, identity, settings, first_process):
    """The newest complete checkpoint of this same run, or None to start from the beginning.
    Checkpoints of another run are refused; incomplete ones and, when starting over, old ones are
    removed."""
    folder = Path(checkpoint_dir)
    complete = complete_checkpoints(checkpoint_dir)
    for path in folder.glob("checkpoint-*"):
        if str(path) not in complete and first_process:  # written as the run was killed: never used
            print(f"Removing {path}: an incomplete checkpoint (the run stopped while writing it).")
            shutil.rmtree(path, ignore_errors=True)
    run_file = folder / "run.json"
    if complete and settings["resume"]:
        changed = (differences(json.loads(run_file.read_text()), json.loads(json.dumps(identity)))
                   if run_file.is_file() else [f"no {run_file.name} beside them"])
        if changed:
            raise SystemExit(
                f"finetune.py: {checkpoint_dir}/ holds checkpoints of a run with another dataset "
                f"or other settings ({'; '.join(changed)}; see {run_file}). Delete "
                f"{checkpoint_dir}/ to start over, or restore those settings to resume.")
        if first_process:
            print(f"Resuming from {complete[-1]} (delete {checkpoint_dir}/ to start over instead).")
            if identity["optimizer_state"] == "disk":  # tests/test_resume.py measures the gap
                print("With the optimizer state on disk, DeepSpeed 0.19.8 restores the weights "
                      "exactly but starts Adam's step count over: the run goes on close to, not "
                      "exactly as, an uninterrupted one.")
        return complete[-1]
    if first_process:  # starting over: old checkpoints and curves must not mix with the new run's
        for path in complete + [str(folder / "runs")]:  # runs/: the Trainer's TensorBoard files
            shutil.rmtree(path, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(identity, indent=1) + "\n")
    return None


def differences(theirs, ours, prefix=""):
    """What differs between the checkpoints' run.json and this run's identity, one entry a setting."""
    changed = []
    for key in sorted(set(theirs) | set(ours), key=str):
        old, new = theirs.get(key, "not set"), ours.get(key, "not set")
        if isinstance(old, dict) and isinstance(new, dict):
            changed += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}: {old} there, {new} now")
    return changed


def remove_finished(checkpoint_dir, offload_dir):
    """Once out/ is complete the checkpoints, and the optimizer state's files of SETUP "disk", only
    take space."""
    if Path(checkpoint_dir).exists():
        shutil.rmtree(checkpoint_dir)
        print(f"Removed {checkpoint_dir}/: the run is complete.")
    swap_files = Path(offload_dir) / "zero_stage_3"  # DeepSpeed's folder in offload_dir
    if swap_files.exists():
        shutil.rmtree(swap_files)
        print(f"Removed {swap_files}/: the optimizer state's files.")
