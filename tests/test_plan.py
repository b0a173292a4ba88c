"""The plan finetune.py makes before loading any weights: host RAM and GPU memory for GPT-J-6B.

A GPT-J-6B is described by its config alone (GPTJConfig() defaults, no weights), and the machine by
finetune.PLAN: the same code path a user's run takes, up to the point where it would load 12 GB.
"""

import pytest
from transformers import GPTJConfig

import finetune
from test_finetune import make_dataset


@pytest.fixture
def gptj_6b_run(tmp_path, tiny_model, configure):
    """finetune.py pointed at a GPT-J-6B config (6.05e9 parameters) and a small dataset."""
    GPTJConfig().save_pretrained(tmp_path / "gpt-j-6B-config-only")
    dataset_dir = make_dataset(tmp_path, tiny_model, configure)
    configure(finetune.MODEL, name=str(tmp_path / "gpt-j-6B-config-only"), revision=None, block_size=64)
    configure(finetune.FILES, dataset_dir=dataset_dir, out_dir=str(tmp_path / "out"),
              checkpoint_dir=str(tmp_path / "checkpoints"))
    return tmp_path


def test_counts_gptj_6b_without_loading_it(gptj_6b_run):
    assert finetune.count_parameters(finetune.MODEL) == pytest.approx(6.05e9, rel=0.01)


def test_desktop_with_64_gib_ram_is_stopped_before_loading(gptj_6b_run, configure):
    configure(finetune.PLAN, host_ram_gib=64, gpu_memory_gib=24)
    with pytest.raises(SystemExit) as stopped:
        finetune.main()
    message = str(stopped.value)
    print(message)
    assert "needs ~136 GiB of host RAM at its peak (full fine-tuning, optimizer state in RAM" in message
    assert "this machine has 64 GiB (free RAM + swap)" in message
    # The settings that would fit, with their measured costs:
    assert "set OFFLOAD['optimizer'] = 'nvme' in finetune.py" in message and "~50 GiB of RAM and ~97 GB of disk" in message
    assert "set LORA in finetune.py (adapters instead of all weights: ~2 GiB of RAM" in message
    assert not (gptj_6b_run / "checkpoints").exists()  # stopped before anything was written


def test_the_low_ram_setting_fits_64_gib_and_says_what_it_needs(gptj_6b_run, configure, tmp_path):
    configure(finetune.PLAN, host_ram_gib=64, gpu_memory_gib=24)
    configure(finetune.OFFLOAD, optimizer="nvme", nvme_path=str(tmp_path / "nvme"))
    configure(finetune.TRAINING, per_device_train_batch_size=8)
    plan = finetune.check_memory(finetune.count_parameters(finetune.MODEL), 2048)
    assert "Host RAM: ~50.3 GiB at peak (full fine-tuning, optimizer state on disk), 64.0 GiB available" in plan
    assert "GPU memory: per_device_train_batch_size=8; up to 26 fit(s) this 24.0 GiB card" in plan


def test_a_32_gib_desktop_is_offered_lora_only(gptj_6b_run, configure, tmp_path):
    configure(finetune.PLAN, host_ram_gib=32, gpu_memory_gib=24)
    configure(finetune.OFFLOAD, optimizer="nvme", nvme_path=str(tmp_path / "nvme"))
    with pytest.raises(SystemExit) as stopped:
        finetune.main()
    message = str(stopped.value)
    assert "needs ~50 GiB of host RAM at its peak (full fine-tuning, optimizer state on disk" in message
    assert "OFFLOAD['optimizer'] = 'nvme'" not in message and "set LORA in finetune.py" in message


@pytest.mark.disk_size("64m")
def test_the_low_ram_setting_checks_the_disk_of_its_files(small_disk, gptj_6b_run, configure):
    configure(finetune.OFFLOAD, optimizer="nvme", nvme_path=str(small_disk / "nvme"))
    configure(finetune.CHECKPOINTS, every_steps=None)
    with pytest.raises(SystemExit, match=r"the disk holding .*/nvme/ has 0.067 GB free, but this run needs 96.8\d\d GB "
                                         r"there: the optimizer state's files \(96.8\d\d GB\)\. Free some space"):
        finetune.check_disk(finetune.count_parameters(finetune.MODEL), finetune.FILES)


@pytest.mark.parametrize("gpu_gib, batch", [(24, 5), (16, 1), (12, 0)])
def test_lora_plan_agrees_with_the_measured_batches(gpu_gib, batch, configure):
    configure(finetune.__dict__, LORA={"r": 16, "target_modules": ["q_proj", "v_proj"]})
    assert finetune.largest_batch(gpu_gib, 2048) == batch  # bench/results.json: lora-24, lora-16


def test_lora_on_a_card_too_small_for_the_model_is_told_to_train_fully(configure):
    configure(finetune.__dict__, LORA={"r": 16, "target_modules": ["q_proj", "v_proj"]})
    configure(finetune.PLAN, host_ram_gib=32, gpu_memory_gib=12)
    with pytest.raises(SystemExit, match=r"Not even one sample fits: LoRA keeps the whole FP16 model"):
        finetune.check_memory(6.05e9, 2048)


def test_too_large_batch_is_stopped_with_the_batch_that_fits(gptj_6b_run, configure):
    configure(finetune.PLAN, host_ram_gib=256, gpu_memory_gib=24)
    configure(finetune.TRAINING, per_device_train_batch_size=27)
    configure(finetune.MODEL, block_size=2048)
    with pytest.raises(SystemExit, match=r"per_device_train_batch_size=27 does not fit a 24.0 GiB GPU .* "
                                         r"Set it to 26 or less"):
        finetune.check_memory(finetune.count_parameters(finetune.MODEL), 2048)


@pytest.mark.parametrize("gpu_gib, batch", [(8, 2), (12, 10), (16, 14), (24, 26)])
def test_plan_agrees_with_the_measured_table(gpu_gib, batch):
    assert finetune.largest_batch(gpu_gib, 2048) == batch  # README's table, bench/results.json


@pytest.mark.parametrize("gpu_gib, block_size, batch", [(10, 2048, 6), (20, 2048, 20), (40, 2048, 48),
                                                        (80, 2048, 103), (24, 1024, 52), (6, 2048, None)])
def test_plan_between_and_beyond_the_measured_cards(gpu_gib, block_size, batch):
    assert finetune.largest_batch(gpu_gib, block_size) == batch


def test_a_card_smaller_than_any_measured_is_not_stopped(configure):
    configure(finetune.PLAN, host_ram_gib=256, gpu_memory_gib=6)
    plan = finetune.check_memory(6.05e9, 2048)
    assert "GPU memory: 6.0 GiB on the card; batches were measured on cards of 8 GiB and more only." in plan


def test_what_fits_is_said_not_stopped(configure):
    configure(finetune.PLAN, host_ram_gib=150, gpu_memory_gib=24)
    configure(finetune.TRAINING, per_device_train_batch_size=26)
    plan = finetune.check_memory(6.05e9, 2048, finetune.pin_host_memory(6.05e9))
    assert "Host RAM: ~136.4 GiB at peak (full fine-tuning, optimizer state in RAM), 150.0 GiB available" in plan
    assert ("GPU memory: per_device_train_batch_size=26; up to 26 fit(s) this 24.0 GiB card (full fine-tuning, "
            "optimizer state in RAM, measured on GPT-J-6B).") in plan


def test_host_memory_is_pinned_where_the_ram_holds_its_peak(configure):
    configure(finetune.PLAN, host_ram_gib=160, gpu_memory_gib=24)
    pinned = finetune.pin_host_memory(6.05e9)
    assert pinned is True  # bench/results.json: ours-24-pinned, 154.1 GiB peak
    zero = finetune.deepspeed_config(finetune.OFFLOAD, pinned)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert finetune.DS_CONFIG["zero_optimization"]["offload_param"]["pin_memory"] is False  # ds_config.py untouched
    plan = finetune.check_memory(6.05e9, 2048, pinned)
    assert "Host RAM: ~154.1 GiB at peak (full fine-tuning, optimizer state in RAM, pinned), 160.0 GiB available" in plan
    assert "Not pinned" not in plan


def test_below_the_pinned_peak_it_is_not_pinned_and_says_what_pinning_needs(configure):
    configure(finetune.PLAN, host_ram_gib=150, gpu_memory_gib=24)
    pinned = finetune.pin_host_memory(6.05e9)
    assert pinned is False
    zero = finetune.deepspeed_config(finetune.OFFLOAD, pinned)["zero_optimization"]
    assert not zero["offload_param"]["pin_memory"] and not zero["offload_optimizer"]["pin_memory"]
    plan = finetune.check_memory(6.05e9, 2048, pinned)
    assert "Not pinned: pinned host memory (faster copies to the GPU: 1.4-1.6x the tokens/s measured) would need " \
           "~154 GiB." in plan


def test_pinning_forced_on_a_host_too_small_for_it_is_stopped_with_the_fix(gptj_6b_run, configure):
    configure(finetune.PLAN, host_ram_gib=150, gpu_memory_gib=24)
    configure(finetune.OFFLOAD, pin_memory=True)
    with pytest.raises(SystemExit, match=r"needs ~154 GiB of host RAM at its peak \(full fine-tuning, optimizer state "
                                         r"in RAM, pinned;.* Either set OFFLOAD\['pin_memory'\] = 'auto' in finetune.py "
                                         r"\(not pinned: ~136 GiB of RAM"):
        finetune.main()


@pytest.mark.parametrize("setting", [dict(optimizer="nvme"), dict(), dict(pin_memory="yes")])
def test_no_pinning_without_a_gpu_or_with_the_optimizer_on_disk(setting, configure, tmp_path):
    configure(finetune.PLAN, host_ram_gib=256, gpu_memory_gib=24 if setting else None)  # None here: no GPU (CPU)
    configure(finetune.OFFLOAD, nvme_path=str(tmp_path / "nvme"), **setting)
    if setting.get("pin_memory") == "yes":
        with pytest.raises(SystemExit, match=r"OFFLOAD\['pin_memory'\] is 'yes'; it must be True, False or 'auto'"):
            finetune.pin_host_memory(6.05e9)
        return
    assert finetune.pin_host_memory(6.05e9) is False
    assert "Not pinned" not in finetune.check_memory(6.05e9, 2048)


@pytest.mark.parametrize("host_gib, pinned", [(157, True), (156, False)])
def test_two_gpus_of_one_host_need_a_little_more_ram(host_gib, pinned, configure, monkeypatch):
    monkeypatch.setenv("LOCAL_SIZE", "2")  # what `deepspeed --num_gpus 2` sets in each process
    configure(finetune.PLAN, host_ram_gib=host_gib, gpu_memory_gib=24)
    assert finetune.host_ram_needed(6.05e9) == pytest.approx(136.4 + 2.5, abs=0.1)  # bench: 2.5 GiB more in use than 1 GPU
    assert finetune.pin_host_memory(6.05e9) is pinned  # 154.1 + 2.5 (pinned: 2.1 more measured)
