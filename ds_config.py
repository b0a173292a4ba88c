"""The DeepSpeed ZeRO-3 configuration finetune.py hands to the Trainer, adapted to each set-up.

"auto" marks every value the HF Trainer owns (batch sizes, accumulation, learning rate, clipping,
precision, bucket sizes from the model's width): the Trainer fills them in from finetune.py's
TRAINING dict, so each number lives in one place and the two can never disagree. deepspeed_config()
at the end adapts DS_CONFIG to the set-up plan.py chose.
"""

import copy
from pathlib import Path

DS_CONFIG = {
    "zero_optimization": {
        # ZeRO-3: parameters, gradients and optimizer state all partitioned / offloaded (set-up
        # "lora": ZeRO-2, below)
        "stage": 3,
        # Parameters live in host RAM and visit the GPU one layer at a time: 12 GB of FP16 weights
        # off the GPU.
        "offload_param": {"device": "cpu", "pin_memory": False},
        # Adam runs on the CPU (DeepSpeed's compiled CPU Adam): its fp32 master weights, m and v and
        # the fp32 gradients (16 bytes a parameter) never touch the GPU. pin_memory (both offloads):
        # page-locked RAM, which the GPU copies to and from directly; deepspeed_config() sets it for
        # set-up "ram-pinned".
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "overlap_comm": True,  # overlap gradient reduction/copies with the backward pass
        "contiguous_gradients": True,  # copy gradients into one buffer: less GPU fragmentation
        "reduce_bucket_size": "auto",  # Trainer: hidden_size^2
        # Trainer: 0.9 * hidden_size^2; bigger = more GPU memory, less waiting
        "stage3_prefetch_bucket_size": "auto",
        # Trainer: 10 * hidden_size; smaller params stay on the GPU
        "stage3_param_persistence_threshold": "auto",
        "sub_group_size": 1e9,  # parameters per optimizer step chunk; smaller = lower RAM transient
        "stage3_max_live_parameters": 1e9,  # parameters gathered at once; lower = less GPU memory
        "stage3_max_reuse_distance": 1e9,  # keep a gathered parameter if it is used again this soon
        # Gather the partitioned weights into one 16-bit state dict when the Trainer saves, so out/
        # holds a consolidated model that plain from_pretrained loads. Without it only ZeRO shards
        # are written.
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    # FP16 with dynamic loss scaling: the scale starts at 2^initial_scale_power, halves on overflow
    # (that step is skipped) and doubles after loss_scale_window clean steps.
    "fp16": {
        "enabled": "auto",  # Trainer: TrainingArguments.fp16 (on for GPUs, off on CPU)
        "loss_scale": 0,  # 0 = dynamic
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,  # overflows tolerated before the scale drops
        "min_loss_scale": 1,  # a scale stuck here means FP16 has collapsed: lower the learning rate
    },
    # Trainer: TrainingArguments.bf16 (cards that have it; GPT-J's FP16 weights load)
    "bf16": {"enabled": "auto"},
    # DeepSpeed's own AdamW, which becomes the compiled CPU Adam because the optimizer is offloaded.
    # No "scheduler" key: the Trainer's own schedule is used (DeepSpeed's WarmupLR starts at LR 0
    # and never decays, which on a few MB of text never leaves warm-up).
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    },
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "steps_per_print": 1_000_000,  # the Trainer logs progress; keep DeepSpeed's step prints quiet
    "wall_clock_breakdown": False,
}

# ZeRO-Infinity, for set-up "disk": the optimizer state (fp32 master weights, Adam m and v) lives in
# files on a disk and is streamed through host RAM a sub-group at a time at each optimizer step,
# instead of sitting in host RAM. Same arithmetic, same results; slower. These entries replace
# DS_CONFIG's; deepspeed_config() fills in "nvme_path". Needs DeepSpeed's async I/O op (libaio).
NVME_OFFLOAD = {
    "zero_optimization": {
        "offload_optimizer": {"device": "nvme", "nvme_path": None, "pin_memory": False,
                              # sub-groups in flight: 4 x sub_group_size x 4 bytes of RAM
                              "buffer_count": 4},
        "sub_group_size": 1e8,  # parameters per swapped chunk: smaller = less RAM, more requests
    },
    # The async I/O op's requests (DeepSpeed's defaults for an NVMe SSD; "thread_count" is not read,
    # the threads are "intra_op_parallelism"). Reading the next sub-group while one steps
    # (pipeline_read and pipeline_write) ran out of swap buffers at buffer_count 8
    # (bench/RESULTS.md): not used.
    "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1,
            "single_submit": False, "overlap_events": True},
}

# The FP16 weights on the GPUs (set-ups "gpu", "ram-optimizer", "lora"): ZeRO-3 splits them between
# the GPUs (LoRA's ZeRO-2 does not); none cross to and from RAM at every micro-step.
WEIGHTS_ON_GPU = {"zero_optimization": {"offload_param": {"device": "none"}}}

# The optimizer state on the GPUs too (set-ups "gpu" and "lora"): nothing offloaded.
OPTIMIZER_ON_GPU = {
    "zero_optimization": {"offload_optimizer": {"device": "none"}},
    # PyTorch's AdamW: DeepSpeed's own GPU Adam would be compiled with nvcc on first use.
    "optimizer": {"params": {"torch_adam": True}},
}

# LoRA with the whole model on each GPU: ZeRO-2 partitions the adapters' gradients and optimizer
# state only, without ZeRO-3's hooks around every layer (14,401 against 12,914 tokens/s at B=12 in
# 24 GiB, bench/RESULTS.md).
LORA_ON_GPU = {"zero_optimization": {"stage": 2}}


def deepspeed_config(setup, offload_dir):
    """DS_CONFIG for plan.py's set-up: pinned host buffers where it says so, the entries above in
    place of DS_CONFIG's where the weights or the optimizer state stay on the GPU or go to disk."""
    config = copy.deepcopy(DS_CONFIG)
    zero = config["zero_optimization"]
    zero["offload_param"]["pin_memory"] = zero["offload_optimizer"]["pin_memory"] = setup["pinned"]
    if setup["weights"] == "gpu":
        merge(config, copy.deepcopy(WEIGHTS_ON_GPU))
        if setup["lora"]:
            merge(config, copy.deepcopy(LORA_ON_GPU))
    merge(config, copy.deepcopy({"gpu": OPTIMIZER_ON_GPU, "disk": NVME_OFFLOAD}.get(
        setup["optimizer_state"], {})))
    if setup["optimizer_state"] == "disk":
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        zero["offload_optimizer"]["nvme_path"] = str(Path(offload_dir).resolve())
    return config


def merge(config, changes):
    for key, value in changes.items():
        if isinstance(value, dict):
            merge(config.setdefault(key, {}), value)
        else:
            config[key] = value
