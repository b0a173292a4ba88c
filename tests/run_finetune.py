"""Started by the tests through DeepSpeed's launcher: finetune.main() with its dicts updated from a JSON file.

    deepspeed --num_gpus 1 tests/run_finetune.py settings.json   # {"MODEL": {...}, "SETUP": "ram", ...}

An optional "DS_CONFIG" entry is merged into ds_config.DS_CONFIG (bench/: DeepSpeed's precision variants).
The optional "KILL" entry makes the run kill itself with SIGKILL (what the OOM killer or a power cut
does: no handler runs, nothing is flushed) at a chosen moment:
  {"after_step": N}      right after optimizer step N
  {"in_checkpoint": N}   half-way through writing checkpoint-N (after DeepSpeed's first file of it)
  {"in_final_save": true} after out.partial/ is written, before it becomes out/
or, like Ctrl-C in a terminal, sends SIGINT to its whole process group (launcher included):
  {"ctrl_c_after_step": N}
or fills the disk that holds a folder, leaving 4 KiB, after optimizer step N or when training ends
(the final save begins):
  {"fill_disk": "path/to/folder", "after_step": N}   {"fill_disk": "path/to/folder"}
"""

import json
import os
import signal
import sys
from pathlib import Path

import artifacts
import ds_config
import finetune


def kill_self(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)


def arm(kill):
    if ("after_step" in kill and "fill_disk" not in kill) or "ctrl_c_after_step" in kill:
        from transformers import TrainerCallback

        class KillAfterStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == kill.get("after_step"):
                    kill_self()
                if state.global_step == kill.get("ctrl_c_after_step"):
                    os.killpg(os.getpgrp(), signal.SIGINT)

        original_train = finetune.train
        finetune.train = lambda *args, **kwargs: original_train(*args, callbacks=[KillAfterStep()], **kwargs)
    if "in_checkpoint" in kill:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        original_save = TorchCheckpointEngine.save

        def save_then_die(self, state_dict, path):
            original_save(self, state_dict, path)
            if f"checkpoint-{kill['in_checkpoint']}" in str(path):
                kill_self()

        TorchCheckpointEngine.save = save_then_die
    if "fill_disk" in kill:
        from transformers import TrainerCallback

        def fill():
            free = os.statvfs(kill["fill_disk"])
            (Path(kill["fill_disk"]) / "filler").write_bytes(b"\0" * (free.f_bavail * free.f_frsize - 4096))

        class FillDisk(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == kill.get("after_step"):
                    fill()

            def on_train_end(self, args, state, control, **kwargs):
                if "after_step" not in kill:
                    fill()

        original_train = finetune.train
        finetune.train = lambda *args, **kwargs: original_train(*args, callbacks=[FillDisk()], **kwargs)
    if kill.get("in_final_save"):
        artifacts.write_training_log = kill_self  # runs after save_model wrote out.partial/, before the swap


if __name__ == "__main__":
    settings = json.loads(Path(sys.argv[-1]).read_text())  # the launcher puts --local_rank=N before it
    arm(settings.pop("KILL", {}))
    ds_config.merge(ds_config.DS_CONFIG, settings.pop("DS_CONFIG", {}))
    for name, values in settings.items():
        if isinstance(getattr(finetune, name), dict):
            getattr(finetune, name).update(values)
        else:  # SETUP
            setattr(finetune, name, values)
    finetune.main()
