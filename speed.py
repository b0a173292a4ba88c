"""This card's speed: the H200's measured step times scaled to another GPU, its PCIe link and host.

A step is `accumulation` micro-steps and one optimizer step. A micro-step is bound by compute (its
measured seconds a sample, times H200 / this card's tensor throughput) or by the weights' and
gradients' traffic over PCIe (its bytes at the H200's measured effective rate, times H200 / this
link's rate), whichever is slower. CPU Adam's optimizer step scales with the host's threads (not
faster than measured), GPU Adam's with the card. What it leaves out: memory bandwidth, clocks under
load, drivers, a slower CPU per core, several GPUs talking. Trust it to ~25% on the H200 and to a
factor of ~1.5 elsewhere (README: "How fast on my card").
"""

import os
from pathlib import Path

# Dense FP16 tensor throughput with FP32 accumulation (what PyTorch's FP16/bf16 matmuls use), TFLOP/s,
# from NVIDIA's architecture whitepapers and datasheets; memory (GB as sold) and PCIe link for
# planning a card that is not in this machine (finetune.py's MACHINE["gpu"]).
CARDS = {  # name as torch reports it, lower case: (TFLOP/s, memory GiB, PCIe GT/s, lanes)
    "h200": (989, 139.8, 32, 16),  # datasheet: 1,979 with sparsity; measured 790 on 8192^3 products
    "h100 pcie": (756, 79.6, 32, 16),
    "h100": (989, 79.6, 32, 16),
    "a100": (312, 79.2, 16, 16),
    "rtx 6000 ada": (364, 47.5, 16, 16),
    "l40s": (362, 44.4, 16, 16),
    "rtx a6000": (155, 47.5, 16, 16),
    "rtx 5090": (210, 31.4, 32, 16),  # Blackwell GB202 whitepaper
    "rtx 4090": (165, 23.6, 16, 16),  # Ada AD102 whitepaper: 165.2 (330.4 with sparsity)
    "rtx 3090 ti": (80, 23.6, 16, 16),
    "rtx 3090": (71, 23.6, 16, 16),  # Ampere GA102 whitepaper: 71 (142 with FP16 accumulation)
}
# Cards with FP8 tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell), for finetune.py's FP8.
FP8_CARDS = {"h200", "h100 pcie", "h100", "rtx 6000 ada", "l40s", "rtx 5090", "rtx 4090"}
# Else: SMs x clock x FP16 FLOP per clock and SM of the architecture (compute capability); the
# GeForce rate where workstation cards of the same chip have twice it.
FLOP_PER_CLOCK_AND_SM = {(7, 0): 1024, (7, 5): 512, (8, 0): 2048, (8, 6): 512, (8, 9): 512,
                         (9, 0): 4096, (10, 0): 4096, (12, 0): 512}
ASSUMED_CLOCK_GHZ = 1.9  # boost clock of recent cards; torch does not report it

# Where the step times were measured (plan.MEASURED["steps"]): one H200, PCIe 5.0 x16.
REFERENCE = {"name": "H200", "tflops": 989, "link_gts": 32, "lanes": 16}
# Effective host-to-GPU rate of ZeRO-3's streaming there, GB/s, from transfer-bound micro-steps:
# lora-ram at B=3 moved 4 bytes a parameter (24.2 GB) in 1.571 s (pinned); ram at B=2, 6 bytes
# (36.3 GB) in 4.37 s (unpinned).
STREAMING_GB_S = {"pinned": 15.4, "unpinned": 8.3}


def this_card(gpu_name=None, cpu_threads=None):
    """The card to estimate for: `gpu_name` (e.g. "RTX 4090", from CARDS) or this machine's GPU 0;
    None without either. Also the host's CPU threads (CPU Adam runs on them)."""
    threads = cpu_threads or torch_threads()
    if gpu_name:
        known = card_in_table(gpu_name)
        if known is None:
            raise SystemExit(f"finetune.py: MACHINE['gpu'] is {gpu_name!r}, not a card in speed.CARDS "
                             f"({', '.join(CARDS)}); set it to one of them, or to None for this machine's.")
        tflops, memory_gib, link_gts, lanes = CARDS[known]
        return {"name": gpu_name, "tflops": tflops, "how": "table", "memory_gib": memory_gib,
                "link_gts": link_gts, "lanes": lanes, "cpu_threads": threads,
                "fp8": known in FP8_CARDS}
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0)))
    known = card_in_table(properties.name)
    if known:
        tflops, how = CARDS[known][0], "table"
    else:
        rate = FLOP_PER_CLOCK_AND_SM.get((properties.major, properties.minor), 512)
        tflops = properties.multi_processor_count * ASSUMED_CLOCK_GHZ * rate / 1e3
        how = f"{properties.multi_processor_count} SMs x {ASSUMED_CLOCK_GHZ} GHz (assumed) x {rate}"
    link_gts, lanes = pcie_link(properties)
    return {"name": properties.name, "tflops": tflops, "how": how,
            "memory_gib": properties.total_memory / 2**30, "link_gts": link_gts, "lanes": lanes,
            "cpu_threads": threads, "fp8": (properties.major, properties.minor) >= (8, 9)}


def card_in_table(name):
    """The key of CARDS that is in `name` (the longest such, so "RTX 3090 Ti" is not a 3090), or None."""
    matches = [key for key in CARDS if key in name.lower()]
    return max(matches, key=len) if matches else None


def torch_threads():
    import torch

    return torch.get_num_threads()


def pcie_link(properties):
    """(GT/s, lanes) of the GPU's PCIe link, the slower of the card's and its slot's, from Linux's
    sysfs; PCIe 4.0 x16 where it cannot be read."""
    try:
        address = (f"{properties.pci_domain_id:04x}:{properties.pci_bus_id:02x}:"
                   f"{properties.pci_device_id:02x}.0")
        device = Path("/sys/bus/pci/devices", address).resolve()
        speeds = [float((folder / "max_link_speed").read_text().split()[0])
                  for folder in (device, device.parent) if (folder / "max_link_speed").exists()]
        return min(speeds), int((device / "max_link_width").read_text())
    except (AttributeError, OSError, ValueError):
        return 16.0, 16


def step_model(record, reference, pcie_bytes, parameters, pinned, optimizer_on):
    """What speed.py needs of a set-up: its measured step (`record`, plan.step()), the seconds a
    sample of a set-up that moves nothing over PCIe (`reference`: compute alone), the bytes a
    parameter it streams each micro-step. Fitted so that the H200 at the record's batch gives the
    record's own time: `overlap` is the share of the lesser of compute and traffic that did not hide
    behind the other; `efficiency` what the set-up's own hooks cost beyond that."""
    model = {"seconds_per_sample": reference["micro_step_s"] / reference["batch"],
             "traffic_gb": pcie_bytes * parameters / 1e9, "pinned": pinned,
             "optimizer_s": max(0.0, record["optimizer_s"]), "optimizer_on": optimizer_on,
             "cpu_threads": record["cpu_threads"],
             "forward_share": record["forward_s"] / record["micro_step_s"],
             "overlap": 0.0, "efficiency": 1.0}
    compute, transfer = micro_step_parts(model, record["batch"], 2048, REFERENCE)
    bound, lesser = max(compute, transfer), min(compute, transfer)
    if record["micro_step_s"] >= bound and lesser > 0:
        model["overlap"] = (record["micro_step_s"] - bound) / lesser
    else:
        model["efficiency"] = record["micro_step_s"] / bound
    return model


def micro_step_parts(model, batch, block_size, card):
    """(compute, PCIe traffic) of one micro-step of `batch` samples on `card`, in seconds."""
    compute = (model["seconds_per_sample"] * batch * block_size / 2048
               * REFERENCE["tflops"] / card["tflops"])
    link = (REFERENCE["link_gts"] * REFERENCE["lanes"]) / (card["link_gts"] * card["lanes"])
    rate = STREAMING_GB_S["pinned" if model["pinned"] else "unpinned"]
    return compute, model["traffic_gb"] / rate * link


def micro_step_seconds(model, batch, block_size, card):
    compute, transfer = micro_step_parts(model, batch, block_size, card)
    return model["efficiency"] * (max(compute, transfer) + model["overlap"] * min(compute, transfer))


def optimizer_step_seconds(model, card):
    """CPU Adam: the measured step on the measured threads, on this host's (never faster); on disk:
    as measured (the SSD's speed); GPU Adam and LoRA's few adapters: scaled by the card."""
    if model["optimizer_on"] == "cpu":
        return model["optimizer_s"] * max(1.0, model["cpu_threads"] / card["cpu_threads"])
    if model["optimizer_on"] == "disk":
        return model["optimizer_s"]
    return model["optimizer_s"] * REFERENCE["tflops"] / card["tflops"]


def step_seconds(model, batch, accumulation, block_size, card):
    return (accumulation * micro_step_seconds(model, batch, block_size, card)
            + optimizer_step_seconds(model, card))


def tokens_per_second(model, batch, accumulation, gpus, block_size, card):
    """Training tokens a second, all GPUs together (each GPU assumed as fast as one alone)."""
    return batch * accumulation * gpus * block_size / step_seconds(model, batch, accumulation,
                                                                   block_size, card)


def run_seconds(model, batch, accumulation, gpus, block_size, card, samples, epochs, eval_batch,
                evaluations):
    """Training and validation of a whole run (not loading, not saving): every micro-step of every
    epoch, an optimizer step per `accumulation` of them (the last with what is left), and each
    validation pass (forwards only)."""
    micro_batches = -(-samples["train"] // (batch * gpus))  # per epoch, as the Trainer counts
    optimizer_steps = -(-micro_batches // accumulation)
    train = epochs * (micro_batches * micro_step_seconds(model, batch, block_size, card)
                      + optimizer_steps * optimizer_step_seconds(model, card))
    validation_batches = -(-samples["validation"] // (eval_batch * gpus))
    forward = micro_step_seconds(model, eval_batch, block_size, card) * model["forward_share"]
    return train + evaluations * validation_batches * forward
