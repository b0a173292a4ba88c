"""What a run needs against what the machine has, decided before any weights load.

MEASURED holds what each set-up cost GPT-J-6B on the GPU machines (bench/results.json names every
record). choose_setup() takes SETUP from finetune.py ("auto" or a set-up's name) and returns the
set-up that runs, with a report that says why, or stops with the settings that would fit.
check_disk() does the same for the disks, batch_plan() writes out the batch arithmetic.
"""

import math
import os
import shutil
from pathlib import Path

import torch

import speed



def step(card_gib, batch, accumulation, tokens_per_s, micro_step_s, forward_s, optimizer_s,
         cpu_threads, record, how="measured"):
    """One optimizer step as the bench timed it (2048 tokens a sample): on one H200 with its memory
    capped to card_gib, `batch` samples a micro-step, the step's tokens/s, a micro-step, its
    forward, the optimizer step's extra time, the host's CPU threads."""
    return {"card_gib": card_gib, "batch": batch, "accumulation": accumulation,
            "tokens_per_s": tokens_per_s, "micro_step_s": micro_step_s, "forward_s": forward_s,
            "optimizer_s": optimizer_s, "cpu_threads": cpu_threads, "record": record, "how": how}


# Per set-up, measured with this code on one H200 capped to each card size (bench/results.json names
# every record, bench/RESULTS.md tells them): host RAM at peak, GPU memory (the largest per-device
# batch of 2048 tokens per card size, or a fixed part, a part per parameter that ZeRO-3 splits
# between the GPUs, and a part per sample), disk, and its steps' times (speed.py scales them to
# another card). Each figure is measured unless its comment says "assumed" or "projected".
# "auto_margin": samples "auto" stays below the largest batch that held a short run.
MEASURED = {
    "parameters": 6.05e9,  # GPT-J-6B; the GPU figures hold for it only
    "gpu": {
        "host_gib": 3,  # assumed: Python's and the libraries' (training peaked at 12.8 GiB)
        "host_bytes_per_parameter": 2,  # assumed: the 16-bit weights gathered into RAM to be saved
        "gpu_bytes_per_parameter": 16,  # FP16 weights and gradients, fp32 master, Adam m and v
        "gpu_mib_fixed": 4200,  # the CUDA context and ZeRO-3's buffers: 115,649 MiB in all at B=26
        "gpu_mib_per_sample": 737,  # assumed as offloaded (the activations are the same)
        "steps": [step(139.8, 26, 4, 10920, 4.825, 1.221, 0.205, 16, "gpu-b26, 2026-12-01")],
    },
    "ram-pinned": {
        # assumed (137 GiB): 154.1 GiB measured before the lean overflow check (17 GiB) and the
        # cached pinned memory handed back; with them, killed at a 124 GiB limit
        "host_bytes_per_parameter": 24.3,
        "largest_batch": {8: 2, 12: 10, 16: 14, 24: 26},  # measured unpinned; pinned +104 MiB at 24
        "gpu_mib_per_sample": 737,
        "auto_margin": 1,  # the batches held 2 steps; lora-ram's held 24 only one sample below
        "steps": [step(24, 26, 8, 8716, 5.104, 1.319, 8.041, 32, "ours-24-pinned, 2026-11-28")],  # 9,586 once
    },
    "ram-optimizer": {
        # 111.6 GiB, pinned: fp32 master, m, v, gradients, FP16 gradients (the weights: on the GPU)
        "host_bytes_per_parameter": 19.8,
        "gpu_bytes_per_parameter": 2,  # the FP16 weights, split between the GPUs
        "gpu_mib_fixed": 4400,  # 24,047 MiB in all at B=11 (24 GiB: 11 fit)
        "gpu_mib_per_sample": 737,  # as the other full set-ups
        "steps": [step(24, 11, 8, 7962, 2.115, 0.524, 5.711, 16, "ram-weights-gpu-pinned-24, 2026-12-02")],
    },
    "ram": {
        # 119.5 GiB: FP16 weights and gradients, fp32 master, m, v, gradients
        "host_bytes_per_parameter": 21.2,
        # card GiB: samples (whole process, 2048 tokens)
        "largest_batch": {8: 2, 12: 10, 16: 14, 24: 26},
        "gpu_mib_per_sample": 737,  # beyond the largest card measured
        "auto_margin": 1,  # as ram-pinned
        "steps": [step(24, 26, 8, 6513, 7.494, 1.311, 5.45, 16, "ram-24-save, 2026-12-01")],
    },
    "lora": {
        "host_gib": 3,  # assumed: Python's and the libraries'
        # the FP16 model read into RAM before it goes to the GPU (peak 12.2 GiB); at the end the
        # base model again, to merge the adapters into (bench/merge_bench.py: 11.7 GiB at the peak)
        "host_bytes_per_parameter": 2,
        "gpu_bytes_per_parameter": 2,  # the frozen FP16 weights, whole on each GPU (ZeRO-2)
        # 16 GiB: B=1 (2 held 2 steps, 539 MiB left); 24 GiB: 12 (13 and 14 held 2 steps, not faster)
        "gpu_mib_fixed": 3460,
        "gpu_mib_per_sample": 768,
        "steps": [step(16, 1, 2, 10639, 0.205, 0.059, -0.025, 16, "lora-16-b1, 2026-12-04"),
                  step(24, 12, 2, 14783, 1.669, 0.528, -0.013, 16, "lora-24, 2026-12-02")],
    },
    "lora-ram": {
        "host_gib": 3,  # assumed: Python's and the libraries' (training peaked at 13.8 GiB)
        "host_bytes_per_parameter": 4,  # frozen FP16 weights, pinned; at the end the model to merge
        # each held over 24 steps (at 8 and 12 GiB, B=4 and 10 fitted 2 steps, then ran out of memory)
        "largest_batch": {8: 3, 12: 9, 16: 15},
        "gpu_mib_per_sample": 820,
        "steps": [step(8, 3, 2, 3950, 1.571, 0.541, -0.031, 16, "lora-ram-8-learn-b3, 2026-12-02"),
                  step(12, 9, 2, 11060, 1.597, 0.539, 0.139, 16, "lora-ram-12-learn-b9, 2026-12-02"),
                  step(16, 15, 2, 12547, 2.454, 0.775, -0.011, 16, "lora-ram-16-learn, 2026-12-02")],
    },
    "disk": {
        "host_bytes_per_parameter": 8.92,  # 50.3 GiB: FP16 weights and gradients; the rest in files
        "disk_bytes_per_parameter": 16,  # 96.8 GB of files: fp32 master weights, m, v, gradients
        "largest_batch": {8: 2, 12: 10, 16: 14, 24: 26},  # assumed as in RAM (same GPU side)
        "gpu_mib_per_sample": 737,
        "auto_margin": 1,  # as ram-pinned
        # Projected: the full model's 97 GB of files do not fit the one-GPU machine's disk; GPT-J with
        # 14 of its 28 layers took 3.699 s a micro-step and 56.6-63.8 s an optimizer step (disk-24-14l,
        # -ga12, 2026-12-02): twice each for 28 layers
        "steps": [step(24, 26, 8, 2372, 7.398, 1.24, 120.4, 16, "projected from disk-24-14l", "projected")],
    },
    # FP8 = True: a micro-step with each block's Linear layers in FP8 (compiled) over one in bf16, on an H100
    # at 24 GiB, same call: ram-optimizer B=11 x 16, 1.681 / 2.050 s (-fp8-compile-ga16, -bf16-ga16); gpu,
    # 14 of GPT-J's blocks, B=4, steps 24-45: 1.62 / 2.00 s (2026-12-07). GPU memory at the peak: +342 MiB.
    "fp8_micro_step": 0.82,
    "host_gib_per_more_gpu": 2.5,  # RAM: from 138.2 to 140.7 GiB at 2 GPUs (pinned 156.8 to 158.9)
    # ZeRO's FP16 weights 2 + fp32 master, Adam m and v 12 + 16-bit model 2
    "checkpoint_bytes_per_parameter": 16,
}

# What each set-up is. SETUP = "auto" takes full fine-tuning, fastest first, where the machine holds
# it; else the LoRA set-up measured fastest on a card of its size, which is far faster than the
# optimizer state on disk and wears no SSD. "disk" runs only when asked for.
SETUPS = {
    "gpu": {"description": "full fine-tuning, nothing offloaded", "lora": False, "weights": "gpu",
            "optimizer_state": "gpu", "pinned": False, "auto": "with a GPU"},
    "ram-pinned": {"description": "full fine-tuning, optimizer state in pinned RAM", "lora": False,
                   "weights": "ram", "optimizer_state": "ram", "pinned": True,
                   "auto": "with a GPU"},
    "ram-optimizer": {"description": "full fine-tuning, weights on the GPU, optimizer state in "
                                     "pinned RAM", "lora": False, "weights": "gpu",
                      "optimizer_state": "ram", "pinned": True, "auto": "with a GPU"},
    "ram": {"description": "full fine-tuning, optimizer state in RAM", "lora": False,
            "weights": "ram", "optimizer_state": "ram", "pinned": False, "auto": True},
    "lora": {"description": "LoRA adapters, the frozen FP16 model on the GPU", "lora": True,
             "weights": "gpu", "optimizer_state": "gpu", "pinned": False, "auto": True},
    "lora-ram": {"description": "LoRA adapters, the frozen FP16 model in pinned RAM", "lora": True,
                 "weights": "ram", "optimizer_state": "ram", "pinned": True, "auto": True},
    "disk": {"description": "full fine-tuning, optimizer state on disk", "lora": False,
             "weights": "ram", "optimizer_state": "disk", "pinned": False, "auto": False},
}


def count_parameters(config):
    """The model's parameter count from its config alone (built on the 'meta' device: no memory, no
    weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(parameter.numel()
                   for parameter in AutoModelForCausalLM.from_config(config).parameters())


def this_machine(overrides):
    """The machine to plan for: finetune.py's MACHINE values where set, else this one's readings;
    "card" is what speed.py estimates from (None on a CPU)."""
    card = speed.this_card(overrides.get("gpu"), overrides.get("cpu_threads"))
    gpu_gib = overrides["gpu_memory_gib"] or (card["memory_gib"] if card else None)
    host_gib = overrides["host_ram_gib"] or (meminfo("MemAvailable") + meminfo("SwapFree")) / 2**30
    # The launcher's processes on this machine: LOCAL_SIZE (deepspeed) or LOCAL_WORLD_SIZE
    # (torchrun).
    processes = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return {"host_ram_gib": host_gib, "gpu_memory_gib": gpu_gib, "processes_on_host": processes,
            "gpus": gpu_count(), "card": card}


def meminfo(field):
    """A /proc/meminfo field in bytes (Linux)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def host_ram_needed(name, parameters, processes=1):
    """GiB of host RAM at peak for a set-up, for all of this machine's GPU processes: ZeRO-3 splits
    the optimizer state between them, so each more GPU adds little; under ZeRO-2 each reads the
    whole model."""
    measured = MEASURED[name]
    copies = processes if whole_model_on_each_gpu(name) else 1
    return (measured.get("host_gib", 0)
            + measured.get("host_bytes_per_parameter", 0) * parameters * copies / 2**30
            + MEASURED["host_gib_per_more_gpu"] * (processes - 1))


def whole_model_on_each_gpu(name):
    """LoRA with the model on the GPUs runs ZeRO-2 (ds_config.LORA_ON_GPU), which does not split
    the weights."""
    return SETUPS[name]["lora"] and SETUPS[name]["weights"] == "gpu"


def gpu_mib_needed(name, samples, block_size, gpus=1, parameters=MEASURED["parameters"]):
    """GPU memory a set-up measured as a fixed part + a part per sample needs for `samples` a
    device. ZeRO-3 splits the states between the GPUs; LoRA's ZeRO-2 keeps the model whole."""
    measured = MEASURED[name]
    splitting = 1 if whole_model_on_each_gpu(name) else gpus
    states_mib = measured.get("gpu_bytes_per_parameter", 0) * parameters / splitting / 2**20
    return (measured["gpu_mib_fixed"] + states_mib
            + samples * measured["gpu_mib_per_sample"] * block_size / 2048)


def largest_batch(name, gpu_gib, block_size, gpus=1, parameters=MEASURED["parameters"]):
    """The largest per-device batch of a set-up on a card of gpu_gib (None below the smallest card
    measured). From a fixed part and a part per sample; or from a table of cards: between two, the
    line between them, above the largest, one more sample per gpu_mib_per_sample. Shorter blocks fit
    more samples."""
    measured = MEASURED[name]
    per_sample = measured["gpu_mib_per_sample"] * block_size / 2048
    if "gpu_mib_fixed" in measured:  # a fixed part, the states (split between GPUs), the samples
        return max(0, int((gpu_gib * 1024 - gpu_mib_needed(name, 0, block_size, gpus, parameters))
                          // per_sample))
    cards = sorted(measured["largest_batch"].items())
    if gpu_gib < cards[0][0]:
        return None
    batch = cards[-1][1] + (gpu_gib - cards[-1][0]) * 1024 / measured["gpu_mib_per_sample"]
    for (small_gib, small_batch), (large_gib, large_batch) in zip(cards, cards[1:]):
        if small_gib <= gpu_gib <= large_gib:
            batch = small_batch + ((large_batch - small_batch) * (gpu_gib - small_gib)
                                   / (large_gib - small_gib))
            break
    return int(batch * 2048 / block_size + 1e-9)


def assess(name, parameters, block_size, training, full_batch, machine, fp8=False):
    """One set-up on this machine: what it needs, the batch it would run at, its speed (in FP8 where
    FP8 is asked for and applies), and why it does not fit (None if it does)."""
    host_needed = host_ram_needed(name, parameters, machine["processes_on_host"])
    gpu_gib, measured_model = (machine["gpu_memory_gib"],
                               abs(parameters / MEASURED["parameters"] - 1) < 0.05)
    fits = (largest_batch(name, gpu_gib, block_size, machine["gpus"])
            if gpu_gib and measured_model else None)
    most = max(1, fits - MEASURED[name].get("auto_margin", 0)) if fits else 1
    batch, accumulation = split_batch(training, full_batch, most, machine["gpus"])
    record = measured_step(name, gpu_gib)
    fp8_off = fp8_off_because(SETUPS[name], machine) if fp8 else None
    in_fp8 = fp8 and not fp8_off
    estimate = (speed.tokens_per_second(step_model(name, record, in_fp8), batch, accumulation,
                                        machine["gpus"], block_size, machine["card"])
                if machine["card"] and measured_model else None)
    result = {"name": name, **SETUPS[name], "host_gib": host_needed, "largest_batch": fits,
              "batch": batch, "accumulation": accumulation, "record": record,
              "estimate": estimate, "measured_model": measured_model, "why_not": None,
              "fp8": in_fp8, "fp8_off": fp8_off}
    if host_needed > machine["host_ram_gib"]:
        result["why_not"] = (f"needs ~{host_needed:.0f} GiB of host RAM at its peak, more "
                             f"than the {machine['host_ram_gib']:.0f} GiB this machine has "
                             f"(free RAM + swap)")
        result["then"] = "the kernel's OOM killer would stop it minutes in"
        result["last"] = "use a machine with more RAM, or add swap (slow, but it runs)"
    elif fits == 0 and "gpu_mib_fixed" in MEASURED[name]:  # where such a card starts
        one_sample = gpu_mib_needed(name, 1, block_size, machine["gpus"]) / 1024
        each = "on each of its GPUs" if machine["gpus"] > 1 else "on one GPU"
        result["why_not"] = (f"needs ~{one_sample:.0f} GiB of GPU memory for one sample {each}, "
                             f"more than this {gpu_gib:.1f} GiB card")
        result["then"], result["last"] = ("CUDA would run out of memory",
                                          "use a GPU with more memory")
    elif fits is not None and batch > fits:
        result["why_not"] = (f"does not fit per_device_train_batch_size={batch} on a {gpu_gib:.1f} "
                             f"GiB GPU (up to {fits}, measured on GPT-J-6B at {block_size} tokens "
                             f"a sample)")
        result["then"] = (f"CUDA would run out of memory: set it to {fits} or less, or \"auto\"")
        result["last"] = "use a GPU with more memory"
    return result


def fp8_off_because(setup, machine):
    """Why FP8 = True does not apply to a set-up on this machine; None where it does (on a CPU too:
    torchao runs FP8 there, slowly, which is how the tests train in it)."""
    card = machine["card"]
    if setup["lora"]:
        return "LoRA set-ups stay in 16 bits (FP8 was measured for full fine-tuning)"
    if card and not card["fp8"]:
        return f"the {card['name']} has no FP8 tensor cores (RTX 40xx and 50xx, H100 and H200 have)"
    return None


def split_batch(training, full_batch, most, gpus):
    """(per-device batch, accumulation): TRAINING's numbers where it gives them; for "auto", `most`
    samples a GPU (the most measured to fit, 1 where none was measured) and the accumulation that
    makes FULL_BATCH across all GPUs, the batch then evened out over the micro-steps (the full batch
    can come out a few samples above FULL_BATCH, never below)."""
    batch = training["per_device_train_batch_size"]
    accumulation = training.get("gradient_accumulation_steps", "auto")
    if batch == "auto":
        if accumulation == "auto":
            accumulation = math.ceil(full_batch / (most * gpus))
        batch = min(most, math.ceil(full_batch / (accumulation * gpus)))
    if accumulation == "auto":
        accumulation = math.ceil(full_batch / (batch * gpus))
    return batch, accumulation


def measured_step(name, gpu_gib):
    """The step measured on the card size nearest this one's."""
    return min(MEASURED[name]["steps"], key=lambda record: abs(record["card_gib"] - (gpu_gib or 0)))


def step_model(name, record, fp8=False):
    """speed.py's model of a set-up's step: its record, the compute of a sample from the set-up of
    its kind that moves nothing over PCIe ("gpu" or "lora"), the bytes it streams a micro-step; with
    FP8, that compute shortened as measured."""
    setup = SETUPS[name]
    reference = MEASURED["lora"]["steps"][-1] if setup["lora"] else MEASURED["gpu"]["steps"][0]
    if setup["weights"] == "ram":  # fetched for the forward and again for the backward
        pcie_bytes = 4 if setup["lora"] else 6  # + full fine-tuning's FP16 gradients back
    else:
        pcie_bytes = 2 if setup["optimizer_state"] == "ram" else 0  # the FP16 gradients to RAM
    optimizer_on = {"gpu": "gpu", "ram": "cpu", "disk": "disk"}[setup["optimizer_state"]]
    model = speed.step_model(record, reference, pcie_bytes, MEASURED["parameters"],
                             setup["pinned"], optimizer_on)
    model["seconds_per_sample"] *= MEASURED["fp8_micro_step"] if fp8 else 1
    return model


def choose_setup(choice, parameters, facts, training, full_batch, machine, fp8=False):
    """The set-up that runs: SETUP's, or for "auto" the fastest of SETUPS that fits on this machine
    (facts: the dataset's block_size and, where known, its sample counts; fp8: finetune.py's FP8).
    Stops before any weights load if it does not fit, with the set-ups that would. Returns the
    set-up, with its batch, its optimizer steps, whether it trains in FP8 and a report to print."""
    block_size = facts["block_size"]
    if choice != "auto" and choice not in SETUPS:
        raise SystemExit(f"finetune.py: SETUP is {choice!r}; it must be 'auto' or one of "
                         f"{', '.join(repr(name) for name in SETUPS)}.")
    if fp8 and not training.get("bf16"):
        raise SystemExit("finetune.py: FP8 = True needs TRAINING['bf16'] = True (FP8 was measured beside bf16 "
                         "weights and gradients, not FP16's); set it, or FP8 = False.")
    options = [assess(name, parameters, block_size, training, full_batch, machine, fp8)
               for name in SETUPS]
    if choice == "auto":
        fitting = [option for option in options if not option["why_not"] and (
            option["auto"] is True or option["auto"] == "with a GPU" and machine["gpu_memory_gib"])]
        if not fitting:
            raise SystemExit(f"finetune.py: no set-up fits this machine.\n"
                             f"{table(options, machine)}")
        # Full fine-tuning where it fits, else LoRA; the fastest on this card (estimated), or
        # without a card's estimate, full fine-tuning in the order of SETUPS and the LoRA set-up
        # measured fastest on a card of this size.
        full = [option for option in fitting if not option["lora"]] or fitting
        estimated = all(option["estimate"] for option in full)  # GPT-J-6B on a known card
        if estimated:
            setup = max(full, key=lambda option: option["estimate"])
        else:
            setup = full[0] if not full[0]["lora"] else max(full, key=measured_tokens_per_s)
        why = ('SETUP = "auto": full fine-tuning where it fits, else LoRA; '
               + ('the fastest on this card' if estimated else 'fastest first'))
    else:
        setup, why = (next(option for option in options if option["name"] == choice),
                      f'SETUP = "{choice}"')
    if setup["why_not"]:
        others = [f"set SETUP = '{option['name']}' ({option['description']}: "
                  f"~{option['host_gib']:.0f} GiB of RAM, {measured(option)})"
                  for option in options if not option["why_not"] and option is not setup]
        raise SystemExit(f"finetune.py: this run ({setup['description']}) {setup['why_not']}; "
                         f"{setup['then']}. Or else "
                         + "; or ".join(others + [setup["last"]]) + ".")
    eval_batch = training.get("per_device_eval_batch_size", "auto")
    setup["batch_settings"] = {"per_device_train_batch_size": setup["batch"],
                               "gradient_accumulation_steps": setup["accumulation"],
                               "per_device_eval_batch_size": setup["batch"] if eval_batch == "auto"
                               else eval_batch}
    setup["step_seconds"] = (setup["batch"] * setup["accumulation"] * machine["gpus"] * block_size
                             / setup["estimate"] if setup["estimate"] else None)
    counts, epochs = facts.get("counts"), training.get("num_train_epochs", 1)
    setup["optimizer_steps"] = (optimizer_steps(counts["train"]["samples"], setup["batch"],
                                                setup["accumulation"], machine["gpus"], epochs)
                                if counts else None)
    lines = [report(setup, why, options, training, full_batch, machine)]
    if counts and setup["estimate"]:
        lines.append(run_time(setup, counts, setup["batch_settings"]["per_device_eval_batch_size"],
                              1 + math.ceil(epochs), epochs, block_size, machine))
    return {**setup, "report": "\n".join(lines)}


def report(setup, why, options, training, full_batch, machine):
    """What choose_setup() decided and why: the set-ups, the host RAM, the batch, the speed."""
    lines = [f"Set-up: {setup['name']} ({setup['description']}), from {why}.",
             table(options, machine),
             f"Host RAM: ~{amount(setup['host_gib'])} GiB at peak ({setup['description']}), "
             f"{machine['host_ram_gib']:.1f} GiB available (free RAM + swap)."]
    gpus, card_gib = machine["gpus"], machine["gpu_memory_gib"]
    full = setup["batch"] * setup["accumulation"] * gpus
    chosen = [f"{value} ({'auto' if training.get(key, 'auto') == 'auto' else 'TRAINING'})"
              for key, value in (("per_device_train_batch_size", setup["batch"]),
                                 ("gradient_accumulation_steps", setup["accumulation"]))]
    devices = f"{gpus} GPU(s)" if card_gib else f"{gpus} process(es)"
    lines.append(f"Batch: {chosen[0]} per device x {chosen[1]} accumulation x {devices} = "
                 f"{full} samples a step (FULL_BATCH = {full_batch}).")
    if setup["largest_batch"] is not None:
        auto = max(1, setup["largest_batch"] - MEASURED[setup["name"]].get("auto_margin", 0))
        lines.append(f"GPU memory: up to {setup['largest_batch']} sample(s) fit this "
                     f"{card_gib:.1f} GiB card ({setup['description']}, measured on GPT-J-6B); "
                     f"auto takes {auto}.")
    elif card_gib and setup["measured_model"]:
        smallest = min(MEASURED[setup["name"]].get("largest_batch", {8: 0}))
        lines.append(f"GPU memory: {card_gib:.1f} GiB on the card; batches were measured on cards "
                     f"of {smallest} GiB and more only.")
    elif card_gib and training.get("per_device_train_batch_size", "auto") == "auto":
        lines.append("GPU memory: batches were measured on GPT-J-6B only; for this model auto takes 1 "
                     "sample a micro-step. More may fit and run faster: set per_device_train_batch_size.")
    if setup["fp8"]:
        lines.append(f"FP8: on: each block's Linear layers multiply in FP8 (torchao, compiled), "
                     f"micro-steps ~{1 - MEASURED['fp8_micro_step']:.0%} shorter (measured on an H100).")
    elif setup["fp8_off"]:
        lines.append(f"FP8: off: {setup['fp8_off']}.")
    card = machine["card"]
    if card and setup["estimate"]:
        lines.append(f"Speed on this card ({card['name']}: {card['tflops']:.0f} TFLOP/s FP16, "
                     f"PCIe {card['link_gts']:g} GT/s x{card['lanes']}, {card['cpu_threads']} CPU "
                     f"threads): ~{setup['estimate']:,.0f} tokens/s estimated (speed.py); "
                     f"{measured(setup)}.")
    return "\n".join(lines)


def table(options, machine):
    """Every set-up on this machine, one line each: what it needs and its speed, or why not."""
    rows = []
    for option in options:
        batch = (f", up to {option['largest_batch']} a GPU"
                 if option["largest_batch"] is not None else "")
        here = (f", ~{option['estimate']:,.0f} on this card at {option['batch']} x "
                f"{option['accumulation']}" if option["estimate"] else "")
        state = option["why_not"] or (f"~{amount(option['host_gib'])} GiB of RAM{batch}, "
                                      f"{measured(option)}{here}")
        if option["auto"] is False:
            state += " (only when asked for)"
        elif option["auto"] is not True and not machine["gpu_memory_gib"]:
            state += " (auto: with a GPU only)"
        rows.append(f"  {option['name']:<13} {option['description']}: {state}")
    return "\n".join(rows)


def measured(option):
    """The measured (or projected) figure, with where: "7,962 tokens/s measured on an H200 with 24
    GiB usable (B=11 x 8)"."""
    record = option["record"]
    usable = "all of its 139.8 GiB" if record["card_gib"] > 139 else f"{record['card_gib']:g} GiB"
    return (f"{measured_tokens_per_s(option):,.0f} tokens/s {record['how']} on an H200 with "
            f"{usable} usable (B={record['batch']} x {record['accumulation']})")


def measured_tokens_per_s(option):
    return option["record"]["tokens_per_s"]


def amount(value):
    """GiB or GB as the plan prints them: one decimal, or two significant digits below 0.1."""
    return f"{value:.1f}" if value >= 0.1 else f"{value:.2g}"


def check_disk(parameters, setup, files, checkpoints, on_gpu):
    """Stop before training if the disks cannot hold the checkpoints this run will write and the
    final model; else say what they take."""
    model_bytes = (2 if on_gpu else 4) * parameters  # FP16 on GPUs, FP32 on CPU
    checkpoint_bytes = (0.01 * model_bytes if setup["lora"] else  # LoRA: the adapters
                        MEASURED["checkpoint_bytes_per_parameter"] * parameters)
    every = checkpoints["every_steps"]
    # Written every `every` steps, never at the last step alone; `keep` of them stay, and one more
    # exists while the next is written.
    steps = setup["optimizer_steps"]
    written = min(steps // every, checkpoints["keep"] + 1) if every and steps is not None else \
        checkpoints["keep"] + 1 if every else 0
    offload_bytes = (MEASURED["disk"]["disk_bytes_per_parameter"] * parameters
                     if setup["name"] == "disk" else 0)
    parts = [(files["out_dir"], model_bytes, f"the model ({model_bytes / 1e9:.3f} GB)"),
             (files["checkpoint_dir"], checkpoint_bytes * written,
              f"up to {written} checkpoint(s) of {checkpoint_bytes / 1e9:.3f} GB"),
             (files["offload_dir"], offload_bytes,
              f"the optimizer state's files ({offload_bytes / 1e9:.3f} GB)")]
    needs = {}  # per disk: (bytes needed, folders, what they hold)
    for folder, size, what in parts:
        if size:
            disk = existing_parent(folder).stat().st_dev
            needed, folders, whats = needs.get(disk, (0, [], []))
            needs[disk] = (needed + size, folders + [folder], whats + [what])
    for needed, folders, whats in needs.values():
        # What the run will replace (old checkpoints, the previous out/, old offload files) counts
        # as free.
        replaced = sum(path.stat().st_size for folder in folders if Path(folder).exists()
                       for path in Path(folder).rglob("*") if path.is_file())
        free = shutil.disk_usage(existing_parent(folders[0])).free + replaced
        if free < needed:
            raise SystemExit(
                f"finetune.py: the disk holding {' and '.join(f + '/' for f in folders)} has "
                f"{free / 1e9:.3f} GB free, but this run needs {needed / 1e9:.3f} GB there: "
                f"{', '.join(whats)}. Free some space, point FILES at a larger disk, or set "
                f"CHECKPOINTS['every_steps'] = None (no resume after a crash).")
    offload = (f" + {amount(offload_bytes / 1e9)} GB of optimizer state in {files['offload_dir']}/"
               if offload_bytes else "")
    model = f"Disk: {amount(model_bytes / 1e9)} GB for the model{offload}"
    if not every:
        return f"{model}; no checkpoints (a killed run starts over)."
    each = f"{amount(checkpoint_bytes / 1e9)} GB each"
    if not written:
        return (f"{model}; no checkpoint: {steps} optimizer step(s), fewer than "
                f"CHECKPOINTS['every_steps'] = {every} ({each}; a killed run starts over).")
    apart = (f", ~{duration(every * setup['step_seconds'])} apart on this card"
             if setup.get("step_seconds") else "")
    return (f"{model}, up to {amount(checkpoint_bytes * written / 1e9)} GB of checkpoints "
            f"({written} x {each}, every {every} steps{apart}).")


def existing_parent(folder):
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    return path


def gpu_count():
    """Processes taking part: the launcher's WORLD_SIZE, else the GPUs this machine has (1 on
    CPU)."""
    return int(os.environ.get("WORLD_SIZE", 0)) or max(1, torch.cuda.device_count())


def optimizer_steps(train_samples, batch, accumulation, gpus, epochs):
    """Optimizer steps of a run, as the Trainer counts: each GPU gets ceil(samples / (batch * gpus))
    micro-batches per epoch (with several GPUs the last ones are filled up with repeated samples),
    and an optimizer step every `accumulation` micro-batches, the last one with whatever is left."""
    micro_batches = math.ceil(train_samples / (batch * gpus))
    return math.ceil(math.ceil(micro_batches / accumulation) * epochs)


def batch_plan(train_samples, training, gpus, block_size):
    """The batch arithmetic, as text: full batch, optimizer steps, and what a partial last step
    means (training: TRAINING with the numbers the plan chose)."""
    batch, accumulation, epochs = (training["per_device_train_batch_size"],
                                   training["gradient_accumulation_steps"],
                                   training["num_train_epochs"])
    full_batch_size = batch * accumulation * gpus
    micro_batches = math.ceil(train_samples / (batch * gpus))
    steps_per_epoch = math.ceil(micro_batches / accumulation)
    last_step_samples = train_samples - (steps_per_epoch - 1) * full_batch_size
    repeated = micro_batches * batch * gpus - train_samples if gpus > 1 else 0
    devices = f"{gpus} GPU{'s' * (gpus > 1)}" if torch.cuda.is_available() else \
        f"{gpus} process{'es' * (gpus > 1)} (CPU)"
    lines = [
        f"Batch plan: {batch} per device x {accumulation} accumulation x {devices} = full "
        f"batch of {full_batch_size} samples ({full_batch_size * block_size:,} tokens per "
        f"optimizer step).",
        f"{train_samples:,} train samples -> {steps_per_epoch:,} optimizer steps per epoch, "
        f"{optimizer_steps(train_samples, batch, accumulation, gpus, epochs):,} in {epochs} "
        f"epoch(s).",
    ]
    if last_step_samples != full_batch_size:
        lines.append(f"The last step of each epoch gets {last_step_samples} new sample(s) instead "
                     f"of {full_batch_size}: a smaller, noisier step (no sample is left out).")
    if repeated:
        lines.append(f"{repeated} samples are seen twice per epoch, to fill the last micro-batch "
                     f"on every GPU.")
    even = [a for a in range(1, 65) if train_samples % (batch * a * gpus) == 0]
    if last_step_samples != full_batch_size or repeated:
        lines.append(f"gradient_accumulation_steps that give equal steps: "
                     f"{', '.join(map(str, even))}." if even else
                     "No gradient_accumulation_steps up to 64 gives equal steps for this sample "
                     "count; that is fine.")
    return "\n".join(lines)


def run_time(setup, counts, eval_batch, evaluations, epochs, block_size, machine):
    """This run's training and validation time on this card, as a line of text."""
    samples = {split: counts[split]["samples"] for split in ("train", "validation")}
    seconds = speed.run_seconds(step_model(setup["name"], setup["record"]), setup["batch"],
                                setup["accumulation"], machine["gpus"], block_size,
                                machine["card"], samples, epochs, eval_batch, evaluations)
    tokens = samples["train"] * block_size * epochs
    return (f"Estimated time: {tokens:,} tokens ({samples['train']:,} samples x {epochs} epoch(s)) "
            f"+ {evaluations} validation pass(es) -> ~{duration(seconds)} of training on this card "
            f"(not counting loading and saving).")


def duration(seconds):
    return (f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"
            if seconds >= 90 else f"{seconds:.0f} s")
