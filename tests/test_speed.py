"""The plan's batch ("auto": split FULL_BATCH into micro-batches that fit) and its estimate of this card's speed
(speed.py), for GPT-J-6B, through the real planner: plan.this_machine() and plan.choose_setup()."""

import math

import pytest

import finetune
import plan
import speed
from test_plan import GPTJ_6B

AUTO = {"per_device_train_batch_size": "auto", "gradient_accumulation_steps": "auto"}


def plan_for(gpu, host_gib, setup="auto", training=AUTO, full_batch=64, gpus=1, counts=None, cpu_threads=16):
    """What finetune.main() plans on a machine with this card (speed.CARDS) and RAM."""
    machine = plan.this_machine({"host_ram_gib": host_gib, "gpu_memory_gib": None, "gpu": gpu,
                                 "cpu_threads": cpu_threads})
    machine.update(gpus=gpus, processes_on_host=gpus)
    facts = {"block_size": 2048, **({"counts": counts} if counts else {})}
    return plan.choose_setup(setup, GPTJ_6B, facts, {"num_train_epochs": 1, **training}, full_batch, machine)


# card, set-up, GPUs, FULL_BATCH -> per-device batch, accumulation (full batch = their product x GPUs)
SPLITS = [
    ("RTX 4090", "lora", 1, 64, 11, 6),  # 11 fit a 23.6 GiB card; 6 x 11 = 66
    ("RTX 4090", "lora", 1, 8, 8, 1),  # FULL_BATCH below what fits: one micro-step
    ("RTX 4090", "lora", 2, 64, 11, 3),  # 2 GPUs: half the accumulation
    ("RTX 4090", "ram-optimizer", 1, 64, 11, 6),
    ("RTX 4090", "ram-optimizer", 1, 128, 11, 12),
    ("RTX 4090", "ram-pinned", 1, 64, 22, 3),  # 25 fit (26 held 2 steps; auto keeps one sample back)
    ("RTX 4090", "lora-ram", 1, 64, 22, 3),
    ("RTX 3090", "ram", 4, 64, 16, 1),
    ("RTX 5090", "lora", 1, 64, 22, 3),
    ("H200", "gpu", 1, 64, 32, 2),
    ("H200", "gpu", 1, 256, 52, 5),  # 63 fit: 5 x 52 = 260
    ("H200", "gpu", 1, 1, 1, 1),
]


@pytest.mark.parametrize("gpu, setup, gpus, full_batch, batch, accumulation", SPLITS)
def test_auto_batch_is_the_most_that_fits_and_makes_the_full_batch(gpu, setup, gpus, full_batch, batch,
                                                                   accumulation):
    chosen = plan_for(gpu, 256, setup, full_batch=full_batch, gpus=gpus)
    assert (chosen["batch"], chosen["accumulation"]) == (batch, accumulation)
    margin = plan.MEASURED[setup].get("auto_margin", 0)
    assert chosen["batch"] <= chosen["largest_batch"] - margin  # never a batch the measured table rules out
    full = chosen["batch"] * chosen["accumulation"] * gpus
    assert full_batch <= full < full_batch + chosen["accumulation"] * gpus  # FULL_BATCH, evened out
    assert chosen["batch_settings"]["per_device_train_batch_size"] == batch
    assert f"Batch: {batch} (auto) per device x {accumulation} (auto) accumulation x {gpus} GPU(s) = {full}" \
        in chosen["report"]


@pytest.mark.parametrize("gpu_gib", [8, 12, 16, 24, 40, 80, 139.8])
@pytest.mark.parametrize("host_gib", [32, 64, 128, 256])
@pytest.mark.parametrize("full_batch", [1, 8, 64, 200])
@pytest.mark.parametrize("gpus", [1, 2])
def test_auto_never_picks_a_batch_that_does_not_fit(gpu_gib, host_gib, full_batch, gpus):
    machine = {"host_ram_gib": host_gib, "gpu_memory_gib": gpu_gib, "processes_on_host": gpus, "gpus": gpus,
               "card": speed.this_card("RTX 4090", 16)}
    try:
        chosen = plan.choose_setup("auto", GPTJ_6B, {"block_size": 2048}, AUTO, full_batch, machine)
    except SystemExit as stopped:
        assert "no set-up fits this machine" in str(stopped)
        return
    assert 1 <= chosen["batch"] <= plan.largest_batch(chosen["name"], gpu_gib, 2048, gpus)
    assert chosen["batch"] * chosen["accumulation"] * gpus >= full_batch


def test_numbers_written_in_training_are_kept_and_checked():
    kept = plan_for("RTX 4090", 64, "lora", {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3})
    assert (kept["batch"], kept["accumulation"]) == (4, 3)
    assert "Batch: 4 (TRAINING) per device x 3 (TRAINING) accumulation x 1 GPU(s) = 12 samples" in kept["report"]
    only_batch = plan_for("RTX 4090", 64, "lora", {"per_device_train_batch_size": 4,
                                                   "gradient_accumulation_steps": "auto"})
    assert (only_batch["batch"], only_batch["accumulation"]) == (4, 16)  # 4 x 16 = FULL_BATCH
    only_accumulation = plan_for("RTX 4090", 64, "lora", {"per_device_train_batch_size": "auto",
                                                          "gradient_accumulation_steps": 2})
    assert (only_accumulation["batch"], only_accumulation["accumulation"]) == (11, 2)  # as many as fit
    with pytest.raises(SystemExit, match=r"does not fit per_device_train_batch_size=12 on a 23.6 GiB GPU \(up to 11"):
        plan_for("RTX 4090", 64, "lora", {"per_device_train_batch_size": 12, "gradient_accumulation_steps": 1})


def test_the_default_training_settings_are_auto():
    assert finetune.TRAINING["per_device_train_batch_size"] == finetune.TRAINING["gradient_accumulation_steps"] \
        == finetune.TRAINING["per_device_eval_batch_size"] == "auto"
    assert finetune.FULL_BATCH == 64


def test_the_estimate_on_the_h200_is_the_measured_step():
    """At a record's own batch, the H200 reproduces the record: the model is fitted to it."""
    card = speed.this_card("H200", 16)
    for name in plan.SETUPS:
        for record in plan.MEASURED[name]["steps"]:
            if record["cpu_threads"] != 16:
                continue
            estimate = speed.tokens_per_second(plan.step_model(name, record), record["batch"],
                                               record["accumulation"], 1, 2048, card)
            # (a boundary micro-step timed faster than the others counts as no optimizer time)
            step = record["accumulation"] * record["micro_step_s"] + max(0, record["optimizer_s"])
            assert estimate == pytest.approx(record["batch"] * record["accumulation"] * 2048 / step, rel=1e-9)
            if record["optimizer_s"] >= 0:
                assert estimate == pytest.approx(record["tokens_per_s"], rel=0.002), (name, record["record"])


def test_the_estimate_for_a_4090_and_a_3090_by_hand():
    """Compute scales by tensor throughput (H200 989, 4090 165, 3090 71 TFLOP/s); traffic by the PCIe link (H200
    PCIe 5.0 x16, the 4090 4.0 x16: twice as long); CPU Adam by the host's threads."""
    rtx_4090, rtx_3090 = speed.this_card("RTX 4090", 16), speed.this_card("RTX 3090", 8)
    # LoRA on the GPU, 12 x 2 (the 24 GiB record's own batch): compute only, 1.669 s / 12 samples on the H200.
    lora = plan.step_model("lora", plan.MEASURED["lora"]["steps"][-1])
    micro = 1.669 * 989 / 165
    assert speed.tokens_per_second(lora, 12, 2, 1, 2048, rtx_4090) == pytest.approx(24 * 2048 / (2 * micro + 0),
                                                                                    rel=1e-3)
    # ram-optimizer, 11 x 6: compute (the "gpu" set-up's 4.825 s / 26 samples, x 989/165) is far above the
    # gradients' 12.1 GB over PCIe; the H200's micro-step (2.115 s) was 9% of that traffic above its compute.
    ram_optimizer = plan.step_model("ram-optimizer", plan.MEASURED["ram-optimizer"]["steps"][0])
    compute, traffic_h200 = 11 * 4.825 / 26, 2 * GPTJ_6B / 1e9 / 15.4
    overlap = (2.115 - 11 * 4.825 / 26) / traffic_h200
    micro_4090 = compute * 989 / 165 + overlap * traffic_h200 * 2
    step_4090 = 6 * micro_4090 + 5.711  # CPU Adam on 16 threads, as measured
    assert speed.tokens_per_second(ram_optimizer, 11, 6, 1, 2048, rtx_4090) == pytest.approx(66 * 2048 / step_4090,
                                                                                             rel=1e-3)
    # The 3090 host has 8 threads: CPU Adam takes twice the measured 5.711 s.
    step_3090 = 6 * (compute * 989 / 71 + overlap * traffic_h200 * 2) + 2 * 5.711
    assert speed.tokens_per_second(ram_optimizer, 11, 6, 1, 2048, rtx_3090) == pytest.approx(66 * 2048 / step_3090,
                                                                                             rel=1e-3)


def test_a_card_not_in_the_table_is_estimated_from_its_sms():
    class Properties:  # what torch.cuda.get_device_properties() reports of an RTX 4080 (76 SMs, Ada: 8.9)
        name, major, minor, multi_processor_count, total_memory = "NVIDIA GeForce RTX 4080", 8, 9, 76, 16 * 2**30

    assert speed.card_in_table(Properties.name) is None
    tflops = Properties.multi_processor_count * speed.ASSUMED_CLOCK_GHZ * 512 / 1e3
    assert tflops == pytest.approx(73.9, abs=0.1)  # NVIDIA's whitepaper: 97.5 at 2.51 GHz; the clock is assumed
    assert speed.card_in_table("NVIDIA GeForce RTX 3090 Ti") == "rtx 3090 ti"  # not a 3090
    with pytest.raises(SystemExit, match=r"MACHINE\['gpu'\] is 'RTX 9999', not a card in speed.CARDS"):
        speed.this_card("RTX 9999")


def test_auto_ranks_the_setups_by_this_cards_estimate():
    """On an H200, ram-pinned (8,716 tokens/s measured) is faster than ram-optimizer (7,962); on a 4090 with a
    16-thread desktop CPU, compute is 6x slower and ram-optimizer's smaller CPU Adam step wins."""
    on_4090 = plan_for("RTX 4090", 256)
    assert on_4090["name"] == "ram-optimizer"
    estimates = {line.split()[0]: line for line in on_4090["report"].splitlines()[1:8]}
    assert "on this card at 11 x 6" in estimates["ram-optimizer"]
    without_card = {"host_ram_gib": 256, "gpu_memory_gib": 24, "processes_on_host": 1, "gpus": 1, "card": None}
    assert plan.choose_setup("auto", GPTJ_6B, {"block_size": 2048}, AUTO, 64, without_card)["name"] == "ram-pinned"
    assert plan_for("RTX 4090", 64)["name"] == "lora"  # LoRA where full fine-tuning does not fit


def test_the_plan_names_the_card_and_estimates_this_runs_time():
    counts = {"train": {"samples": 600}, "validation": {"samples": 30}}
    chosen = plan_for("RTX 4090", 128, counts=counts)
    assert "Speed on this card (RTX 4090: 165 TFLOP/s FP16, PCIe 16 GT/s x16, 16 CPU threads): ~1,689 tokens/s " \
           "estimated (speed.py); 7,962 tokens/s measured on an H200 with 24 GiB usable (B=11 x 8)." in chosen["report"]
    model = plan.step_model("ram-optimizer", plan.MEASURED["ram-optimizer"]["steps"][0])
    card = speed.this_card("RTX 4090", 16)
    micro = speed.micro_step_seconds(model, 11, 2048, card)
    # 600 samples: 55 micro-batches of 11, 10 optimizer steps; 2 validation passes of 3 micro-batches of 11
    seconds = 55 * micro + 10 * 5.711 + 2 * 3 * micro * 0.524 / 2.115
    assert f"-> ~{seconds / 60:.1f} min of training on this card" in chosen["report"]
    assert chosen["optimizer_steps"] == 10 == math.ceil(math.ceil(600 / 11) / 6)


def test_a_model_that_was_not_measured_is_planned_without_an_estimate():
    """Another model on a known card: no measured step to scale, so no estimate, and auto takes SETUPS in order."""
    machine = plan.this_machine({"host_ram_gib": 64, "gpu_memory_gib": None, "gpu": "RTX 4090", "cpu_threads": 16})
    chosen = plan.choose_setup("auto", 4e5, {"block_size": 64}, AUTO, 64, machine)
    assert chosen["name"] == "gpu" and chosen["estimate"] is None and "Speed on this card" not in chosen["report"]
    assert (chosen["batch"], chosen["accumulation"]) == (1, 64)  # nothing measured: one sample a micro-step


def plan_in_fp8(gpu, host_gib, fp8, setup="auto"):
    machine = plan.this_machine({"host_ram_gib": host_gib, "gpu_memory_gib": None, "gpu": gpu, "cpu_threads": 16})
    training = {"num_train_epochs": 1, "bf16": True, **AUTO}
    return plan.choose_setup(setup, GPTJ_6B, {"block_size": 2048}, training, 64, machine, fp8)


def test_fp8_shortens_the_estimate_on_cards_that_have_it_and_says_why_not_elsewhere():
    in_fp8, in_bf16 = plan_in_fp8("RTX 4090", 128, True), plan_in_fp8("RTX 4090", 128, False)
    assert in_fp8["name"] == in_bf16["name"] == "ram-optimizer" and in_fp8["fp8"] and not in_bf16["fp8"]
    assert "FP8: on: each block's Linear layers multiply in FP8 (torchao, compiled), micro-steps ~18% shorter" \
        in in_fp8["report"]
    assert "FP8" not in in_bf16["report"]
    assert 1.1 < in_fp8["estimate"] / in_bf16["estimate"] < 1 / plan.MEASURED["fp8_micro_step"]  # CPU Adam stays
    # An RTX 3090 (Ampere) has no FP8; LoRA, which "auto" picks with 64 GB, stays in 16 bits.
    ampere = plan_in_fp8("RTX 3090", 128, True)
    assert not ampere["fp8"] and "FP8: off: the RTX 3090 has no FP8 tensor cores" in ampere["report"]
    assert ampere["estimate"] == plan_in_fp8("RTX 3090", 128, False)["estimate"]
    lora = plan_in_fp8("RTX 4090", 64, True)
    assert lora["name"] == "lora" and not lora["fp8"]
    assert "FP8: off: LoRA set-ups stay in 16 bits" in lora["report"]
