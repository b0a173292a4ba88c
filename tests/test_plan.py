"""The plan finetune.py makes before loading any weights: the set-up, host RAM, GPU memory and disk for GPT-J-6B.

A GPT-J-6B is described by its config alone (GPTJConfig() defaults, no weights), and the machine by
finetune.MACHINE: the same code path a user's run takes, up to the point where it would load 12 GB.
"""

import pytest
from transformers import AutoTokenizer, GPTJConfig

import ds_config
import finetune
import plan
from test_finetune import make_dataset

GPTJ_6B = 6.05e9


@pytest.fixture
def gptj_6b_run(tmp_path, tiny_model, configure):
    """finetune.py pointed at a GPT-J-6B config (6.05e9 parameters, no weights), the tiny model's tokenizer
    and a small dataset made with it."""
    GPTJConfig().save_pretrained(tmp_path / "gpt-j-6B-config-only")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "gpt-j-6B-config-only")
    dataset_dir = make_dataset(tmp_path, tiny_model, configure)
    configure(finetune.MODEL, name=str(tmp_path / "gpt-j-6B-config-only"), revision=None)
    configure(finetune.FILES, dataset_dir=dataset_dir, out_dir=str(tmp_path / "out"),
              checkpoint_dir=str(tmp_path / "checkpoints"), offload_dir=str(tmp_path / "nvme"))
    return tmp_path


def choose(setup, host_gib, gpu_gib, batch=1, block_size=2048, processes=1, card=None, full_batch=64,
           accumulation=8):
    """plan.choose_setup() for GPT-J-6B on a machine described by hand (card: speed.this_card()'s, or None)."""
    machine = {"host_ram_gib": host_gib, "gpu_memory_gib": gpu_gib, "processes_on_host": processes,
               "gpus": processes, "card": card}
    training = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation}
    return plan.choose_setup(setup, GPTJ_6B, {"block_size": block_size}, training, full_batch, machine)


def set_up(configure, setup, **machine):
    configure(finetune.__dict__, SETUP=setup)
    configure(finetune.MACHINE, **machine)


def test_counts_gptj_6b_without_loading_it():
    assert plan.count_parameters(GPTJConfig()) == pytest.approx(GPTJ_6B, rel=0.01)


def test_in_ram_on_a_64_gib_desktop_is_stopped_before_loading_with_what_fits(gptj_6b_run, configure):
    set_up(configure, "ram", host_ram_gib=64, gpu_memory_gib=24)
    with pytest.raises(SystemExit) as stopped:
        finetune.main()
    message = str(stopped.value)
    print(message)
    assert ("this run (full fine-tuning, optimizer state in RAM) needs ~119 GiB of host RAM at its peak, more than "
            "the 64 GiB this machine has (free RAM + swap)") in message
    # The set-ups that would fit, with their measured costs:
    # (the disk's speed is a projection: the full model's files did not fit the GPU machine's disk)
    assert ("set SETUP = 'disk' (full fine-tuning, optimizer state on disk: ~50 GiB of RAM, 2,372 tokens/s "
            "projected on an H200 with 24 GiB usable (B=26 x 8))") in message
    assert ("set SETUP = 'lora' (LoRA adapters, the frozen FP16 model on the GPU: ~14 GiB of RAM, 14,783 tokens/s "
            "measured on an H200 with 24 GiB usable (B=12 x 2))") in message
    assert not (gptj_6b_run / "checkpoints").exists()  # stopped before anything was written


def test_the_low_ram_setting_fits_64_gib_and_says_what_it_needs():
    setup = choose("disk", host_gib=64, gpu_gib=24, batch=8)
    assert setup["name"] == "disk"
    assert ("Host RAM: ~50.3 GiB at peak (full fine-tuning, optimizer state on disk), 64.0 GiB available"
            in setup["report"])
    assert "Batch: 8 (TRAINING) per device x 8 (TRAINING) accumulation x 1 GPU(s) = 64 samples" in setup["report"]
    assert "GPU memory: up to 26 sample(s) fit this 24.0 GiB card" in setup["report"]


def test_a_32_gib_desktop_is_offered_lora_only(gptj_6b_run, configure):
    set_up(configure, "disk", host_ram_gib=32, gpu_memory_gib=24)
    with pytest.raises(SystemExit) as stopped:
        finetune.main()
    message = str(stopped.value)
    assert "this run (full fine-tuning, optimizer state on disk) needs ~50 GiB of host RAM at its peak" in message
    assert "SETUP = 'disk'" not in message and "set SETUP = 'lora'" in message


@pytest.mark.disk_size("64m")
def test_the_low_ram_setting_checks_the_disk_of_its_files(small_disk, configure):
    configure(finetune.FILES, offload_dir=str(small_disk / "nvme"))
    configure(finetune.CHECKPOINTS, every_steps=None)
    with pytest.raises(SystemExit, match=r"the disk holding .*/nvme/ has 0.067 GB free, but this run needs 96.8\d\d GB "
                                         r"there: the optimizer state's files \(96.8\d\d GB\)\. Free some space"):
        plan.check_disk(GPTJ_6B, choose("disk", 64, 24), finetune.FILES, finetune.CHECKPOINTS, on_gpu=True)


@pytest.mark.parametrize("setup, gpu_gib, batch", [("lora", 24, 12), ("lora", 16, 1), ("lora", 12, 0),
                                                   ("lora-ram", 8, 3), ("lora-ram", 12, 9), ("lora-ram", 16, 15)])
def test_lora_plan_agrees_with_the_measured_batches(setup, gpu_gib, batch):
    assert plan.largest_batch(setup, gpu_gib, 2048) == batch  # bench/results.json: lora-24, lora-ram-8-learn-b3, ...


def test_lora_on_a_card_too_small_for_the_model_is_told_what_fits():
    with pytest.raises(SystemExit) as stopped:
        choose("lora", host_gib=32, gpu_gib=12)
    assert "needs ~15 GiB of GPU memory for one sample on one GPU, more than this 12.0 GiB card" in str(stopped.value)
    assert "set SETUP = 'lora-ram'" in str(stopped.value)


def test_too_large_batch_is_stopped_with_the_batch_that_fits():
    with pytest.raises(SystemExit, match=r"does not fit per_device_train_batch_size=27 on a 24.0 GiB GPU \(up to "
                                         r"26, measured on GPT-J-6B at 2048 tokens a sample\); CUDA would run out "
                                         r"of memory: set it to 26 or less, or \"auto\""):
        choose("ram", host_gib=256, gpu_gib=24, batch=27)


@pytest.mark.parametrize("gpu_gib, batch", [(8, 2), (12, 10), (16, 14), (24, 26)])
def test_plan_agrees_with_the_measured_table(gpu_gib, batch):
    assert plan.largest_batch("ram", gpu_gib, 2048) == batch  # README's table, bench/results.json


@pytest.mark.parametrize("gpu_gib, block_size, batch", [(10, 2048, 6), (20, 2048, 20), (40, 2048, 48),
                                                        (80, 2048, 103), (24, 1024, 52), (6, 2048, None)])
def test_plan_between_and_beyond_the_measured_cards(gpu_gib, block_size, batch):
    assert plan.largest_batch("ram", gpu_gib, block_size) == batch


def test_a_card_smaller_than_any_measured_is_not_stopped():
    report = choose("ram", host_gib=256, gpu_gib=6)["report"]
    assert "GPU memory: 6.0 GiB on the card; batches were measured on cards of 8 GiB and more only." in report


def test_another_models_batch_of_one_is_said_with_how_to_raise_it():
    """For a model other than GPT-J-6B no batch was measured: auto takes 1, and the plan says so, with the
    setting that raises it; a batch set in TRAINING is taken as it is, without the line."""
    machine = {"host_ram_gib": 128, "gpu_memory_gib": 80, "processes_on_host": 1, "gpus": 1, "card": None}
    auto = {"per_device_train_batch_size": "auto", "gradient_accumulation_steps": "auto"}
    setup = plan.choose_setup("gpu", 2.9e9, {"block_size": 2048}, auto, 16, machine)
    assert (setup["batch"], setup["accumulation"]) == (1, 16)
    assert "for this model auto takes 1 sample a micro-step" in setup["report"]
    assert "set per_device_train_batch_size" in setup["report"]
    chosen = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}
    setup = plan.choose_setup("gpu", 2.9e9, {"block_size": 2048}, chosen, 16, machine)
    assert (setup["batch"], setup["accumulation"]) == (4, 4)
    assert "auto takes 1" not in setup["report"]
    assert "auto takes 1" not in choose("ram", host_gib=256, gpu_gib=24, batch="auto")["report"]  # GPT-J-6B


def test_what_fits_is_said_not_stopped():
    report = choose("auto", host_gib=130, gpu_gib=24, batch=26)["report"]
    assert "Host RAM: ~119.5 GiB at peak (full fine-tuning, optimizer state in RAM), 130.0 GiB available" in report
    assert ("GPU memory: up to 26 sample(s) fit this 24.0 GiB card (full fine-tuning, optimizer state in RAM, "
            "measured on GPT-J-6B); auto takes 25.") in report


def test_host_memory_is_pinned_where_the_ram_holds_its_peak():
    setup = choose("auto", host_gib=160, gpu_gib=24)
    assert setup["name"] == "ram-pinned"  # bench/results.json: ours-24-pinned, 154.1 GiB peak
    zero = ds_config.deepspeed_config(setup, "unused")["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert ds_config.DS_CONFIG["zero_optimization"]["offload_param"]["pin_memory"] is False  # DS_CONFIG untouched
    assert ("Host RAM: ~136.9 GiB at peak (full fine-tuning, optimizer state in pinned RAM), 160.0 GiB available"
            in setup["report"])


def test_below_the_pinned_peak_it_is_not_pinned_and_says_what_pinning_needs():
    setup = choose("auto", host_gib=130, gpu_gib=16)  # too small a card for ram-optimizer's weights
    assert setup["name"] == "ram"
    zero = ds_config.deepspeed_config(setup, "unused")["zero_optimization"]
    assert not zero["offload_param"]["pin_memory"] and not zero["offload_optimizer"]["pin_memory"]
    assert ("ram-pinned    full fine-tuning, optimizer state in pinned RAM: needs ~137 GiB of host RAM at its "
            "peak, more than the 130 GiB this machine has") in setup["report"]
    assert ("ram-optimizer full fine-tuning, weights on the GPU, optimizer state in pinned RAM: needs ~16 GiB of "
            "GPU memory for one sample on one GPU, more than this 16.0 GiB card") in setup["report"]


@pytest.mark.parametrize("host_gib", [112, 130])
def test_a_128_gib_desktop_with_a_24_gib_card_keeps_the_weights_on_the_gpu(host_gib):
    """bench/results.json: ram-weights-gpu-pinned-24, 7,962 tokens/s at B=11, host peak 111.6 GiB in a 120 GiB
    cgroup; "ram" (119.5 GiB) would not fit 112 GiB."""
    setup = choose("auto", host_gib=host_gib, gpu_gib=24)
    assert setup["name"] == "ram-optimizer" and setup["largest_batch"] == 11
    zero = ds_config.deepspeed_config(setup, "unused")["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "none"
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert (f"Host RAM: ~111.6 GiB at peak (full fine-tuning, weights on the GPU, optimizer state in pinned RAM), "
            f"{host_gib:.1f} GiB available") in setup["report"]
    assert "up to 11 a GPU, 7,962 tokens/s measured on an H200 with 24 GiB usable (B=11 x 8)" in setup["report"]
    assert choose("auto", host_gib=111, gpu_gib=24)["name"] == "lora"  # below its peak: not chosen


def test_lora_on_the_gpu_runs_zero_2_with_nothing_offloaded():
    setup = choose("lora", host_gib=64, gpu_gib=24)
    config = ds_config.deepspeed_config(setup, "unused")
    assert config["zero_optimization"]["stage"] == 2 and config["optimizer"]["params"]["torch_adam"]
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "none"
    # ZeRO-2 keeps the whole model on each GPU: a second GPU leaves no more room for samples.
    assert plan.largest_batch("lora", 24, 2048, gpus=2) == plan.largest_batch("lora", 24, 2048) == 12
    assert plan.largest_batch("ram-optimizer", 24, 2048, gpus=2) > 11  # ZeRO-3 splits the weights
    # ... and each GPU's process reads the whole model into RAM first (12.2 GiB measured with one).
    assert plan.host_ram_needed("lora", GPTJ_6B, processes=2) == pytest.approx(3 + 2 * 11.27 + 2.5, abs=0.1)
    lora_ram = ds_config.deepspeed_config(choose("lora-ram", 64, 24), "unused")["zero_optimization"]
    assert lora_ram["stage"] == 3 and lora_ram["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_pinning_forced_on_a_host_too_small_for_it_is_stopped_with_the_fix(gptj_6b_run, configure):
    set_up(configure, "ram-pinned", host_ram_gib=130, gpu_memory_gib=24)
    with pytest.raises(SystemExit, match=r"this run \(full fine-tuning, optimizer state in pinned RAM\) needs ~137 "
                                         r"GiB of host RAM.* Or else set SETUP = 'ram-optimizer' \(full fine-tuning, "
                                         r"weights on the GPU, optimizer state in pinned RAM: ~112 GiB of RAM, 7,962 "
                                         r"tokens/s.*; or set SETUP = 'ram' \(full fine-tuning, optimizer state in "
                                         r"RAM: ~119 GiB of RAM"):
        finetune.main()


@pytest.mark.parametrize("setup", ["disk", "auto-without-gpu", "bad"])
def test_no_pinning_without_a_gpu_or_with_the_optimizer_on_disk(setup):
    if setup == "bad":
        with pytest.raises(SystemExit, match=r"SETUP is 'pinned'; it must be 'auto' or one of 'gpu', 'ram-pinned', 'ram-optimizer', 'ram'"):
            choose("pinned", host_gib=256, gpu_gib=24)
        return
    chosen = choose("disk", 256, 24) if setup == "disk" else choose("auto", 256, None)  # None: no GPU (CPU)
    assert chosen["name"] == ("disk" if setup == "disk" else "ram") and not chosen["pinned"]
    if setup != "disk":
        assert ("in pinned RAM: ~136.9 GiB of RAM, 8,716 tokens/s measured on an H200 with 24 GiB usable (B=26 x 8) "
                "(auto: with a GPU only)") in chosen["report"]


@pytest.mark.parametrize("host_gib, setup", [(140, "ram-pinned"), (139, "ram-optimizer"), (115, "ram-optimizer"),
                                             (114, "lora")])
def test_two_gpus_of_one_host_need_a_little_more_ram(host_gib, setup):
    assert plan.host_ram_needed("ram", GPTJ_6B, processes=2) == pytest.approx(119.5 + 2.5, abs=0.1)  # bench: +2.5
    # pinned 136.9 + 2.5 (2.1 more measured); ram-optimizer 111.6 + 2.5
    assert choose("auto", host_gib, 24, processes=2)["name"] == setup


# What "auto" picks for GPT-J-6B, batch 1, by GPU memory (rows) and free host RAM (16, 32, 64, 128, 256 GiB).
AUTO = {
    8: [None, "lora-ram", "lora-ram", "ram", "ram-pinned"],
    12: [None, "lora-ram", "lora-ram", "ram", "ram-pinned"],
    16: ["lora", "lora-ram", "lora-ram", "ram", "ram-pinned"],  # lora-ram: 12,547 tokens/s, lora: 10,639
    24: ["lora", "lora", "lora", "ram-optimizer", "ram-pinned"],  # ram-optimizer: 111.6 GiB of RAM
    80: ["lora", "lora", "lora", "ram-optimizer", "ram-pinned"],
    139: ["gpu"] * 5,  # an H200 holds it all
}


@pytest.mark.parametrize("gpu_gib", AUTO)
@pytest.mark.parametrize("host_index, host_gib", list(enumerate([16, 32, 64, 128, 256])))
def test_auto_picks_a_setup_that_fits_each_machine_and_says_why(gpu_gib, host_index, host_gib):
    expected = AUTO[gpu_gib][host_index]
    if expected is None:
        with pytest.raises(SystemExit, match="no set-up fits this machine") as stopped:
            choose("auto", host_gib, gpu_gib)
        assert "lora-ram      LoRA adapters, the frozen FP16 model in pinned RAM: needs ~26 GiB of host RAM" \
            in str(stopped.value)
        return
    setup = choose("auto", host_gib, gpu_gib)
    assert setup["name"] == expected
    assert setup["host_gib"] <= host_gib and setup["largest_batch"] >= 1  # never one that does not fit
    assert setup["report"].startswith(f"Set-up: {expected} ({setup['description']}), from SETUP = \"auto\"")
    for name in plan.SETUPS:  # every other set-up is listed, with what it needs or why it does not fit
        assert f"\n  {name:<13} {plan.SETUPS[name]['description']}: " in setup["report"]


@pytest.mark.disk_size("4m")
def test_a_run_shorter_than_the_checkpoint_interval_needs_no_checkpoint_space(small_disk, tmp_path, tiny_model,
                                                                              configure):
    """2 optimizer steps with a checkpoint every 20: none is written, so none is counted (the tiny model's two
    checkpoints, 16 bytes a parameter each, would not fit this 4 MiB disk beside the model)."""
    from conftest import run_finetune
    from test_finetune import settings_for

    dataset_dir = make_dataset(tmp_path, tiny_model, configure)
    settings = settings_for(small_disk, tiny_model, dataset_dir, per_device_train_batch_size=26,
                            gradient_accumulation_steps=1, num_train_epochs=1)
    settings["CHECKPOINTS"] = {"every_steps": 20}
    output = run_finetune(settings)
    assert "no checkpoint: 2 optimizer step(s), fewer than CHECKPOINTS['every_steps'] = 20" in output
    assert (small_disk / "out" / "model.safetensors").is_file() and not (small_disk / "checkpoints").exists()
    parameters = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        tiny_model).parameters())
    assert 4 * parameters + 2 * 16 * parameters > 4 * 2**20  # the old plan (keep + 1 checkpoints) would stop


def test_out_dir_that_cannot_be_replaced_is_refused_before_loading(gptj_6b_run, configure):
    """out/ gets the checks token_split's dataset folder gets, before training rather than at its end."""
    set_up(configure, "lora", host_ram_gib=64, gpu_memory_gib=24)
    (gptj_6b_run / "a-file").write_text("not a folder")
    configure(finetune.FILES, out_dir=str(gptj_6b_run / "a-file"))
    with pytest.raises(SystemExit) as stopped:
        finetune.main()
    assert str(stopped.value) == (f"finetune.py: FILES['out_dir'] is '{gptj_6b_run}/a-file', which is a file, not "
                                  f"a folder. Move that file away, or set FILES['out_dir'] in finetune.py to "
                                  f"another folder.")
    assert not (gptj_6b_run / "checkpoints").exists()  # stopped before anything was written
