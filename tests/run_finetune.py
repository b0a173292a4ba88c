"""Started by the tests through DeepSpeed's launcher: finetune.main() with its dicts updated from a JSON file.

    deepspeed --num_gpus 1 tests/run_finetune.py settings.json   # {"MODEL": {...}, "SETUP": "ram", ...}

An optional "DS_CONFIG" entry is merged into ds_config.DS_CONFIG (bench/: DeepSpeed's precision variants);
"FP8": true trains the blocks' Linear layers in FP8 (bench/: torchao's Float8Linear, issue #28); "compile":
the same, with each block one ZeRO-3 leaf and its attention and MLP compiled (the casts fused).
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


def train_in_fp8(compiled):
    from torchao.float8 import convert_to_float8_training

    load_model = finetune.load_model
    if compiled:  # as bench/gpu_bench.py's BLOCKS_AS_LEAVES: no ZeRO-3 hooks inside a block's graphs
        ds_config.merge(ds_config.DS_CONFIG, {"zero_optimization": {
            "leaf_module": {"classes": ["transformers.models.gptj.modeling_gptj.GPTJBlock"]}}})

    def load_in_fp8(*args, **kwargs):
        model = load_model(*args, **kwargs)
        # The blocks' Linear layers only (their dimensions are multiples of 16, as FP8 matmuls need).
        model = convert_to_float8_training(model, module_filter_fn=lambda module, name: ".h." in f".{name}")
        if compiled:
            import torch

            torch._dynamo.config.recompile_limit = 4 * len(model.transformer.h)  # one graph per block
            for block in model.transformer.h:
                block.attn.forward, block.mlp.forward = torch.compile(block.attn.forward), torch.compile(
                    block.mlp.forward)
        return model

    finetune.load_model = load_in_fp8


if __name__ == "__main__":
    settings = json.loads(Path(sys.argv[-1]).read_text())  # the launcher puts --local_rank=N before it
    arm(settings.pop("KILL", {}))
    ds_config.merge(ds_config.DS_CONFIG, settings.pop("DS_CONFIG", {}))
    fp8 = settings.pop("FP8", False)
    if fp8:
        train_in_fp8(compiled=fp8 == "compile")
    for name, values in settings.items():
        if isinstance(getattr(finetune, name), dict):
            getattr(finetune, name).update(values)
        else:  # SETUP
            setattr(finetune, name, values)
    finetune.main()
