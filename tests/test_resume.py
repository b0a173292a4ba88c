"""A run killed at any moment resumes to the same result; Ctrl-C stops cleanly; failures say what to do.

Each run is the process the `deepspeed` launcher starts (the Ctrl-C test goes through the launcher itself),
with ZeRO-3 on CPU. Kills are real SIGKILLs (what
the OOM killer or a power cut does), sent by the run to itself at a chosen moment (tests/run_finetune.py).
"""

import json
import os
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import failures
import finetune
import tiny_gptj
from conftest import REPO, run_finetune
from test_finetune import configure_finetune, make_dataset, settings_for

# 52 samples, full batch 8: 7 optimizer steps per epoch, 14 in all; a checkpoint every 3 steps.
RUN = {"num_train_epochs": 2, "learning_rate": 3e-3}
CHECKPOINTS = {"every_steps": 3, "keep": 1}
# Resumed and uninterrupted runs do the same float operations in the same order on the same data, with
# the optimizer state restored in fp32: measured gap 0. The tolerance only allows for thread scheduling.
TOLERANCE = 1e-6


def settings(tmp_path, tiny_model, dataset_dir, **extra):
    return {**settings_for(tmp_path, tiny_model, dataset_dir, **RUN), "CHECKPOINTS": CHECKPOINTS, **extra}


def step_losses(out_dir):
    log = json.loads((out_dir / "finetune_log.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in log if "loss" in entry}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model):
    tmp_path = tmp_path_factory.mktemp("resume-data")
    with pytest.MonkeyPatch.context() as monkeypatch:
        configure = lambda settings_dict, **values: [monkeypatch.setitem(settings_dict, k, v) for k, v in values.items()]
        return make_dataset(tmp_path, tiny_model, configure)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, dataset):
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    run_finetune(settings(tmp_path, tiny_model, dataset))
    return AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict(), step_losses(tmp_path / "out")


@pytest.mark.parametrize("kill, resumes_from", [
    ({"after_step": 5}, "checkpoint-3"),  # mid-training, between checkpoints
    ({"in_checkpoint": 6}, "checkpoint-3"),  # while checkpoint-6 was being written: it must not be used
    ({"in_final_save": True}, "checkpoint-12"),  # out.partial/ written, not yet swapped in: steps 13
    # and 14 again (no checkpoint at the last step, 14, which is not a multiple of 3)
])
def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_model, dataset, uninterrupted, kill, resumes_from):
    reference_weights, reference_losses = uninterrupted
    run_finetune(settings(tmp_path, tiny_model, dataset, KILL=kill), expect_failure=True)
    assert not (tmp_path / "out").exists()  # nothing that looks like a finished model
    if "in_checkpoint" in kill:
        assert (tmp_path / "checkpoints" / "checkpoint-6").is_dir()
        assert not (tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.json").exists()

    output = run_finetune(settings(tmp_path, tiny_model, dataset))  # the same command again, nothing else
    assert f"Resuming from {tmp_path / 'checkpoints' / resumes_from}" in output
    weights = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    gap = max((weights[name] - reference_weights[name]).abs().max().item() for name in reference_weights)
    print(f"{kill}: largest weight gap to the uninterrupted run {gap:.1e}")
    assert gap <= TOLERANCE
    # Every optimizer step happened once, on the same samples: the same loss at every step.
    losses = step_losses(tmp_path / "out")
    assert sorted(losses) == list(range(1, 15))
    assert losses == pytest.approx(reference_losses, abs=TOLERANCE)
    assert not (tmp_path / "checkpoints").exists()  # removed once out/ is complete
    assert not (tmp_path / "out.partial").exists()


def test_no_checkpoint_is_written_at_the_last_step(tmp_path, tiny_model, dataset):
    """The Trainer checkpoints the last step of every run by itself; save() deletes it once out/ is
    written (~97 GB for GPT-J). A 2-step run with a checkpoint every 20 steps writes none: looked at
    when out.partial/ is written, just before out/ and the clean-up."""
    run = settings(tmp_path, tiny_model, dataset, CHECKPOINTS={"every_steps": 20, "keep": 1},
                   KILL={"in_final_save": True})
    run["TRAINING"]["max_steps"] = 2
    run_finetune(run, expect_failure=True)
    assert (tmp_path / "out.partial" / "model.safetensors").is_file()  # killed in the final save
    assert (tmp_path / "checkpoints" / "run.json").is_file()  # its checkpoint_dir, as it was left
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))


@pytest.mark.async_io
def test_optimizer_state_on_disk_gives_the_same_model_and_resumes(tmp_path, configure, monkeypatch):
    """SETUP "disk" (ZeRO-Infinity): the optimizer state lives in files, the arithmetic is the in-RAM run's.
    DeepSpeed keeps state under 1 MiB in RAM, so this tiny GPT-J is twice as wide (~0.7 M parameters, 2.7 MB)."""
    from deepspeed.accelerator import get_accelerator

    async_io = get_accelerator().create_op_builder("AsyncIOBuilder")
    if not async_io.is_compatible():
        pytest.skip("DeepSpeed's async I/O op needs libaio (./make-venv.sh fetches it; or apt install libaio-dev)")
    # Compiled on first use (3-8 minutes on 2 cores), into the runs' cache, not inside a run's time limit:
    # by conftest.py while the tests before this one ran; load() waits for that build to end.
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", extensions)
    async_io.load()
    wide_model = tiny_gptj.build(REPO / "demo" / "text", str(tmp_path / "tiny-wide"), {**tiny_gptj.TINY, "n_embd": 128})
    dataset_dir = make_dataset(tmp_path, wide_model, configure)
    in_ram, on_disk, killed = tmp_path / "in-ram", tmp_path / "on-disk", tmp_path / "killed"
    run_finetune(settings(in_ram, wide_model, dataset_dir))
    for folder in on_disk, killed:
        on_disk_run = settings(folder, wide_model, dataset_dir, SETUP="disk")
        on_disk_run["FILES"]["offload_dir"] = str(folder / "nvme")
        if folder == killed:
            run_finetune({**on_disk_run, "KILL": {"after_step": 5}}, expect_failure=True)
            assert list((folder / "nvme").rglob("*.swp"))  # the optimizer state was in files, not in RAM
        output = run_finetune(on_disk_run)
        assert f"Removed {folder / 'nvme' / 'zero_stage_3'}/" in output and not list((folder / "nvme").rglob("*.swp"))

    # Uninterrupted, the run with its optimizer state on disk is the in-RAM run, step for step.
    reference = AutoModelForCausalLM.from_pretrained(in_ram / "out").state_dict()
    weights = AutoModelForCausalLM.from_pretrained(on_disk / "out").state_dict()
    assert max((weights[name] - reference[name]).abs().max().item() for name in reference) <= TOLERANCE
    assert step_losses(on_disk / "out") == pytest.approx(step_losses(in_ram / "out"), abs=TOLERANCE)
    # Killed after step 5 and resumed from checkpoint-3: the weights come back exactly (step 4's loss is the
    # same), but DeepSpeed 0.19.8 skips the optimizer's own state dict when it loads an NVMe checkpoint (Adam's
    # step count starts over), so later steps differ a little: close to the uninterrupted run, not identical.
    losses, reference_losses = step_losses(killed / "out"), step_losses(in_ram / "out")
    assert sorted(losses) == list(range(1, 15)) and losses[4] == pytest.approx(reference_losses[4], abs=TOLERANCE)
    final, reference_final = (json.loads((folder / "out" / "finetune_log.json").read_text())["validation_loss_after"]
                              for folder in (killed, in_ram))
    print(f"validation loss after: resumed {final:.4f}, uninterrupted {reference_final:.4f}")
    assert final == pytest.approx(reference_final, rel=0.05)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, tiny_model, dataset, uninterrupted):
    output = run_finetune(settings(tmp_path, tiny_model, dataset, KILL={"ctrl_c_after_step": 7}),
                          expect_failure=True, launcher=True)
    checkpoint = tmp_path / "checkpoints" / "checkpoint-6"
    assert "finetune.py: stopped by Ctrl-C (or the launcher). Stopped at optimizer step 7." in output
    assert f"The newest complete checkpoint is {checkpoint}: run `deepspeed finetune.py` again" in output
    # Our process ends with that message and no traceback (DeepSpeed's own `deepspeed` runner prints a
    # KeyboardInterrupt traceback of its wait() after it; README says so).
    assert "Traceback" not in output.split("finetune.py: stopped by Ctrl-C")[0]
    assert 'finetune.py", line' not in output
    assert not (tmp_path / "out").exists()
    output = run_finetune(settings(tmp_path, tiny_model, dataset))
    assert f"Resuming from {checkpoint}" in output
    weights = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.allclose(weights[n], w, atol=TOLERANCE) for n, w in uninterrupted[0].items())


def test_checkpoints_of_another_run_are_refused(tmp_path, tiny_model, dataset):
    run_finetune(settings(tmp_path, tiny_model, dataset, KILL={"after_step": 4}), expect_failure=True)
    changed = settings(tmp_path, tiny_model, dataset)
    changed["TRAINING"]["learning_rate"] = 1e-3
    output = run_finetune(changed, expect_failure=True)
    assert "holds checkpoints of a run with another dataset or other settings" in output
    assert "(training.learning_rate: 0.003 there, 0.001 now; see " in output  # what to restore
    assert (tmp_path / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists()  # left alone


def test_resume_false_starts_over(tmp_path, tiny_model, dataset, uninterrupted):
    run_finetune(settings(tmp_path, tiny_model, dataset, KILL={"after_step": 4}), expect_failure=True)
    output = run_finetune(settings(tmp_path, tiny_model, dataset, CHECKPOINTS={**CHECKPOINTS, "resume": False}))
    assert "Resuming" not in output
    assert step_losses(tmp_path / "out") == pytest.approx(uninterrupted[1], abs=TOLERANCE)


def test_disk_too_small_for_checkpoints_stops_before_loading(tmp_path, tiny_model, dataset, configure, small_disk):
    # 1 MiB holds the tiny model's ~0.6 MB FP32 weights but not two of its ~2.5 MB checkpoints.
    configure_finetune(configure, settings(tmp_path, tiny_model, dataset))
    configure(finetune.FILES, checkpoint_dir=str(small_disk / "checkpoints"), out_dir=str(small_disk / "out"))
    with pytest.raises(SystemExit, match=r"small-disk/out/ and .*small-disk/checkpoints/ has 0.001 GB free, but "
                                         r"this run needs 0.00\d GB"):
        finetune.main()
    assert list(small_disk.iterdir()) == []  # nothing written


def test_disk_full_while_saving_keeps_the_previous_model(tmp_path, tiny_model, dataset, small_disk):
    (small_disk / "out").mkdir()
    (small_disk / "out" / "config.json").write_text("{}")  # stands for the previous model
    run = settings(tmp_path, tiny_model, dataset, CHECKPOINTS={"every_steps": None},
                   KILL={"fill_disk": str(small_disk)})
    run["FILES"]["out_dir"] = str(small_disk / "out")
    output = run_finetune(run, expect_failure=True)
    assert f"finetune.py: the disk filled up while writing the model to {small_disk / 'out.partial'}/" in output
    assert "There is no checkpoint yet" in output
    assert (small_disk / "out" / "config.json").read_text() == "{}"  # the previous out/ is untouched
    assert not (small_disk / "out.partial").exists()


@pytest.mark.disk_size("32m")
def test_disk_full_while_writing_a_checkpoint_says_so(tmp_path, tiny_model, dataset, small_disk):
    # 32 MiB passes the plan; then the disk is filled after step 2, so checkpoint-3 cannot be written.
    run = settings(tmp_path, tiny_model, dataset, KILL={"fill_disk": str(small_disk), "after_step": 2})
    run["FILES"]["checkpoint_dir"] = str(small_disk / "checkpoints")
    output = run_finetune(run, expect_failure=True)
    assert f"finetune.py: the disk filled up while writing a checkpoint to {small_disk / 'checkpoints'}/." in output
    assert "Stopped at optimizer step 3" in output
    assert 'finetune.py", line' not in output  # said, not a traceback
    assert not (tmp_path / "out").exists()


def test_stale_op_build_lock_is_cleared(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "cpu_adam" / "lock", tmp_path / "fused_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    hour_ago = time.time() - 3600
    import os
    os.utime(stale, (hour_ago, hour_ago))  # left by a build killed an hour ago
    failures.clear_stale_build_locks()
    assert not stale.exists() and fresh.exists()  # a build running right now keeps its lock
    assert "left by a DeepSpeed op build that was interrupted" in capsys.readouterr().out
