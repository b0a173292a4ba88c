"""Fine-tune GPT-J-6B on the dataset token_split.py wrote, with the HF Trainer and DeepSpeed ZeRO-3.

    deepspeed finetune.py                    # every GPU of this machine
    deepspeed --num_gpus 1 finetune.py       # one GPU

Every option is in the dicts below. The DeepSpeed settings are in ds_config.py. The lines that are
specific to ZeRO-3 or FP16 are marked with `# ZeRO-3:` and `# FP16:`.
"""

import copy
import errno
import functools
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import token_split
from ds_config import DS_CONFIG, NVME_OFFLOAD

MODEL = {
    "name": "EleutherAI/gpt-j-6B",  # hub name or local folder (the tokenizer comes from the same place)
    "revision": "float16",  # hub branch: GPT-J's FP16 weights, a 12 GB download instead of 24 GB
    "block_size": 2048,  # tokens per sample; the dataset must have been cut to it (token_split.py)
}

# LoRA instead of full fine-tuning: None = full fine-tuning (all 6 billion parameters, ZeRO-3).
# A dict trains small adapter matrices beside the chosen layers with PEFT, and no DeepSpeed: the frozen
# FP16 model (12 GB) sits on the GPU and the optimizer state is tiny, so host RAM is not the limit.
# At the end the adapters are merged in, so out/ is a plain FP16 model like a full fine-tune's.
LORA = None
# LORA = {
#     "r": 16,  # rank of each adapter: more = more capacity and memory
#     "lora_alpha": 32,  # adapter scale (alpha / r)
#     "lora_dropout": 0.05,
#     "target_modules": ["q_proj", "v_proj"],  # GPT-J's attention query and value projections
# }

# Where full fine-tuning keeps the optimizer state: fp32 master weights and Adam's m and v, 12 bytes a
# parameter (73 GB for GPT-J), plus their gradients. (LoRA has almost none: OFFLOAD does not apply.)
OFFLOAD = {
    # "cpu": in host RAM, fastest (GPT-J: ~136 GiB of RAM at peak). "nvme": in files on a disk (ZeRO-Infinity,
    # needs libaio): ~50 GiB of RAM + ~97 GB of SSD, and each optimizer step reads and writes them (measured 3.3x
    # slower at accumulation 8; more accumulation hides it). README: "Less host RAM".
    "optimizer": "cpu",
    "nvme_path": "nvme_offload",  # "nvme" only: a folder on your fastest SSD; emptied when the run ends
    # "cpu" only: page-locked ("pinned") host buffers, which the GPU copies to and from directly. Measured on
    # GPT-J-6B at batch 26: 8,716-9,586 tokens/s instead of 6,010-6,345, for ~154 GiB of RAM at peak instead of
    # ~136. "auto": pin when this machine has that much; True / False: always / never.
    "pin_memory": "auto",
}

FILES = {
    "dataset_dir": token_split.SETTINGS["dataset_dir"],  # written by `python token_split.py`
    "out_dir": "out",  # the fine-tuned FP16 model + tokenizer; replaced only once a new one is complete
    "checkpoint_dir": "checkpoints",  # resumable training state; removed once out/ is complete
}

# A killed run (OOM killer, power cut, Ctrl-C) continues from its newest complete checkpoint when
# `deepspeed finetune.py` is run again. Delete checkpoint_dir (or set "resume": False) to start over.
CHECKPOINTS = {
    # Optimizer steps between checkpoints; None = never. Each costs about 16 bytes a parameter on disk,
    # ~97 GB for GPT-J (fp32 master weights and Adam moments, 85 GB, + the FP16 model), and minutes to write.
    "every_steps": 20,
    "keep": 1,  # newest checkpoints kept; one more exists while the next is being written
    "resume": True,  # False: start over even if checkpoint_dir holds checkpoints of this run
}
CHECKPOINT_BYTES_PER_PARAMETER = 16  # ZeRO's 2 (FP16) + 4 + 4 + 4 (fp32 master, Adam m, v) + 2 (16-bit model)

# What a run needs, measured with this code on GPT-J-6B (bench/RESULTS.md: H200, seq 2048).
# finetune.py checks them against the machine before loading any weights.
MEASURED = {
    "parameters": 6.05e9,  # GPT-J-6B; the GPU figures hold for it only
    # Host RAM, peak RSS per parameter, whatever the batch size:
    "host_bytes_per_parameter": 24.2,  # OFFLOAD "cpu": 136.4 GiB (FP16 weights + fp32 master, Adam m, v, gradients)
    "host_bytes_per_parameter_pinned": 27.35,  # OFFLOAD "cpu", pinned: 154.1 GiB
    # Each more GPU's process on the host: RAM in use went from 138.2 to 140.7 GiB (pinned 156.8 to 158.9) at 2 GPUs.
    "host_gib_per_more_gpu": 2.5,
    "host_bytes_per_parameter_nvme": 8.92,  # OFFLOAD "nvme": 50.3 GiB (FP16 weights and gradients; the rest on disk)
    "nvme_bytes_per_parameter": 16,  # OFFLOAD "nvme": the files, 96.8 GB (fp32 master, m, v and gradients)
    "lora_host_gib": 2,  # LORA: the weights go straight to the GPU; host RAM is Python's and the libraries'
    # GPU memory of the whole process (allocator + CUDA context), samples of 2048 tokens. Full fine-tuning:
    # the largest per-device batch that ran within each card size (GiB); the weights visit the GPU a layer
    # at a time, and a sample adds ~737 MiB (activation checkpoints, its logits), used above 24 GiB.
    "largest_batch": {8: 2, 12: 10, 16: 14, 24: 26},
    "gpu_mib_per_sample": 737,
    # LORA: the whole FP16 model (11.5 GiB) sits on the GPU, + per sample (measured before causal_lm_loss
    # and one_kernel_gelu saved ~1.3 GiB a sample for full fine-tuning: an upper bound now).
    "lora_gpu_mib_fixed": 12767,
    "lora_gpu_mib_per_sample": 2105,
    # Speed on one H200, tokens/s within 24 GiB, compared like for like: full fine-tuning at B=8 GA 8 (optimizer
    # state in RAM / on disk), LoRA at its largest batch then, 5 (before causal_lm_loss; now B=26: 6,010-6,345,
    # pinned 8,716-9,586):
    "tokens_per_s": {"cpu": 2874, "nvme": 862, "lora": 9486},
}

# The machine to plan for. None = this machine (host: MemAvailable + free swap; GPU: the card's memory).
# Set numbers to see what a run needs on another machine, or to override a wrong reading.
PLAN = {
    "host_ram_gib": None,
    "gpu_memory_gib": None,
}

# Passed straight to transformers.TrainingArguments.
TRAINING = {
    "per_device_train_batch_size": 1,  # samples per GPU per micro-step; GPU memory grows with it (README)
    "per_device_eval_batch_size": 1,  # same cost as training's per sample; larger only speeds evaluation
    "gradient_accumulation_steps": 8,  # micro-steps per optimizer step; costs time, not memory
    "num_train_epochs": 1,  # passes over the training samples
    "learning_rate": 1e-5,  # peak LR; full fine-tuning of a 6B model wants small steps (FP16 overflows above ~1e-4)
    "lr_scheduler_type": "cosine",  # decays to 0 at the last step, however few steps a small corpus gives
    "warmup_steps": 0,  # optimizer steps of linear warm-up from LR 0 (or a fraction of all steps if < 1)
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,  # gradient clipping
    "bf16": False,  # bf16 instead of FP16 on cards that have it (RTX 30xx+, A100, H100): no loss-scale collapse
    "activation_checkpointing": True,  # recompute activations in backward: ~20 GiB less per sample for GPT-J
    "logging_steps": 1,  # print loss and LR every optimizer step
    "seed": 42,  # model-side randomness (data order, dropout); same seed, same run
}


def main():
    # Lets the CUDA allocator grow segments instead of leaving reserved-but-unusable gaps: without it the
    # largest batch that fits 24 GiB was lower (fragmentation), measured in bench/.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the launcher's "stop" is handled like Ctrl-C
    clear_stale_build_locks()
    metadata = check_dataset(FILES["dataset_dir"], MODEL)  # fails fast, before anything is loaded
    parameters = count_parameters(MODEL)
    pinned = pin_host_memory(parameters)
    memory_plan = check_memory(parameters, MODEL["block_size"], pinned)
    disk_plan = check_disk(parameters, FILES)
    tokenizer = load_tokenizer(MODEL, metadata)
    arguments = training_arguments(deepspeed_config(OFFLOAD, pinned) if LORA is None else None)  # ZeRO-3: before the model
    samples = load_samples(FILES["dataset_dir"])
    checkpoint = find_checkpoint(FILES["checkpoint_dir"], run_identity(metadata, arguments), arguments)
    if arguments.process_index == 0:
        print(batch_plan(len(samples["train"]), TRAINING, arguments.world_size, MODEL["block_size"]))
        print(memory_plan)
        print(disk_plan)
    model = load_model(MODEL, arguments)
    trainer = train(model, tokenizer, samples, arguments, checkpoint)
    save(trainer, FILES, metadata)
    leave_together()


def check_dataset(dataset_dir, model_settings):
    """Read the dataset's facts and stop with the fix if it was cut for other settings."""
    metadata = token_split.load_metadata(dataset_dir)
    if metadata["block_size"] != model_settings["block_size"]:
        raise SystemExit(
            f"finetune.py: the dataset in '{dataset_dir}' was cut into blocks of {metadata['block_size']} tokens, "
            f"but MODEL['block_size'] is {model_settings['block_size']}. Set token_split.py's block_size to "
            f"{model_settings['block_size']} and re-run `python token_split.py`, or set MODEL['block_size'] to "
            f"{metadata['block_size']}."
        )
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(model_settings["name"], revision=model_settings["revision"]).n_positions
    if model_settings["block_size"] > context:
        raise SystemExit(f"finetune.py: block_size {model_settings['block_size']} is longer than the model's "
                         f"context of {context} tokens. Lower it in both scripts and re-run token_split.py.")
    return metadata


def load_tokenizer(model_settings, metadata):
    """The model's tokenizer, checked against the one that made the dataset (saved to out/ with the model)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_settings["name"], revision=model_settings["revision"])
    facts = token_split.tokenizer_facts(tokenizer)
    if facts != {key: metadata[key] for key in facts}:
        raise SystemExit(
            f"finetune.py: the dataset was tokenized with '{metadata['tokenizer']}' ({metadata['vocab_size']} tokens), "
            f"which is not the tokenizer of '{model_settings['name']}' ({len(tokenizer)} tokens). Set token_split.py's "
            f"tokenizer to '{model_settings['name']}' and re-run `python token_split.py`."
        )
    return tokenizer


def optimizer_on_disk():
    """Full fine-tuning with OFFLOAD["optimizer"] = "nvme": the optimizer state lives in files."""
    return LORA is None and OFFLOAD["optimizer"] == "nvme"


def deepspeed_config(offload, pinned=False):
    """ds_config.py's DS_CONFIG, with NVME_OFFLOAD's entries in place of its own when the optimizer goes to disk,
    and pinned host buffers for the weights and the optimizer if `pinned` (pin_host_memory)."""
    if offload["optimizer"] not in ("cpu", "nvme"):
        raise SystemExit(f"finetune.py: OFFLOAD['optimizer'] is {offload['optimizer']!r}; it must be 'cpu' or 'nvme'.")
    config = copy.deepcopy(DS_CONFIG)
    if offload["optimizer"] == "cpu":
        config["zero_optimization"]["offload_param"]["pin_memory"] = pinned
        config["zero_optimization"]["offload_optimizer"]["pin_memory"] = pinned
        return config
    for section, entries in NVME_OFFLOAD.items():
        config.setdefault(section, {}).update(copy.deepcopy(entries))
    Path(offload["nvme_path"]).mkdir(parents=True, exist_ok=True)
    config["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(Path(offload["nvme_path"]).resolve())
    return config


def training_arguments(ds_config):
    """TrainingArguments from TRAINING. ds_config=None trains without DeepSpeed (the tests compare both)."""
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    if ds_config is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        import deepspeed

        deepspeed.init_distributed()  # several CPU processes need the process group before TrainingArguments
    return TrainingArguments(
        output_dir=FILES["checkpoint_dir"],  # where the Trainer writes checkpoint-<step>/ folders
        # ZeRO-3: creating TrainingArguments with a ZeRO-3 config makes from_pretrained build the model
        # already partitioned (deepspeed.zero.Init), so no process ever holds all 12 GB of weights.
        deepspeed=ds_config,
        fp16=on_gpu and not TRAINING["bf16"],  # FP16: on GPUs; CPUs have no FP16 kernels, so FP32 there
        use_cpu=not on_gpu,
        eval_strategy="epoch",  # validation loss after every epoch ...
        eval_on_start=True,  # ... and once before the first step, to compare against
        save_strategy="steps" if CHECKPOINTS["every_steps"] else "no",  # out/ itself is written by save()
        save_steps=CHECKPOINTS["every_steps"] or 1,
        save_total_limit=CHECKPOINTS["keep"],
        report_to="none",  # no account-based trackers; the log is saved to out/finetune_log.json
        **TRAINING,
    )


def load_samples(dataset_dir):
    from datasets import load_from_disk

    return load_from_disk(dataset_dir)


def gpu_count():
    """Processes taking part: the launcher's WORLD_SIZE, else the GPUs this machine has (1 on CPU)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", 0)) or max(1, torch.cuda.device_count())


def batch_plan(train_samples, training, gpus, block_size):
    """The batch arithmetic, as text: full batch, optimizer steps, and what a partial last step means."""
    per_device, accumulation = training["per_device_train_batch_size"], training["gradient_accumulation_steps"]
    full_batch_size = per_device * accumulation * gpus
    # As the Trainer counts: each GPU gets ceil(samples / (per_device * gpus)) micro-batches per epoch
    # (with several GPUs the last ones are filled up with repeated samples), and an optimizer step
    # every `accumulation` micro-batches, the last one with whatever is left.
    micro_batches = math.ceil(train_samples / (per_device * gpus))
    steps_per_epoch = math.ceil(micro_batches / accumulation)
    optimizer_steps = math.ceil(steps_per_epoch * training["num_train_epochs"])
    last_step_samples = train_samples - (steps_per_epoch - 1) * full_batch_size
    repeated = micro_batches * per_device * gpus - train_samples if gpus > 1 else 0
    lines = [
        f"Batch plan: {per_device} per device x {accumulation} accumulation x {gpus} GPU(s) "
        f"= full batch of {full_batch_size} samples ({full_batch_size * block_size:,} tokens per optimizer step).",
        f"{train_samples:,} train samples -> {steps_per_epoch:,} optimizer steps per epoch, "
        f"{optimizer_steps:,} in {training['num_train_epochs']} epoch(s).",
    ]
    if last_step_samples != full_batch_size:
        lines.append(f"The last step of each epoch gets {last_step_samples} new samples instead of {full_batch_size}: "
                     f"a smaller, noisier step (no sample is left out).")
    if repeated:
        lines.append(f"{repeated} samples are seen twice per epoch, to fill the last micro-batch on every GPU.")
    even = [a for a in range(1, 65) if train_samples % (per_device * a * gpus) == 0]
    if last_step_samples != full_batch_size or repeated:
        lines.append(f"gradient_accumulation_steps that give equal steps: {', '.join(map(str, even))}." if even else
                     "No gradient_accumulation_steps up to 64 gives equal steps for this sample count; that is fine.")
    return "\n".join(lines)


def load_model(model_settings, arguments):
    """GPT-J in FP16 on GPUs (FP32 on CPU), partitioned by ZeRO-3 while it loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    config = AutoConfig.from_pretrained(model_settings["name"], revision=model_settings["revision"])
    config.use_cache = False  # the generation cache is useless in training and clashes with gradient checkpointing
    model = AutoModelForCausalLM.from_pretrained(
        model_settings["name"],
        revision=model_settings["revision"],
        config=one_kernel_gelu(config),
        # FP16: 2 bytes a parameter, 12 GB for GPT-J (the hub's float16 branch holds exactly these).
        dtype=torch.float16 if arguments.fp16 else torch.bfloat16 if arguments.bf16 else torch.float32,
        # LoRA: the weights load straight onto this process's GPU, no 12 GB copy in host RAM on the way.
        device_map={"": arguments.device} if LORA is not None else None,
    )
    if LORA is None:
        return model
    set_seed(arguments.seed)  # the adapters start random: same seed, same run (the Trainer seeds only later)
    return add_adapters(model, LORA)


def one_kernel_gelu(config):
    """GPT-J's "gelu_new" is the tanh approximation of GELU written as eight tensor operations, four of whose
    results are kept for the backward pass: 4 copies of the MLP's widest activation, ~256 MiB a sample in
    every layer being recomputed. PyTorch's gelu(approximate="tanh") is the same function (the one GPT-J was
    trained with) in one operation that keeps only its input. out/config.json says so; it loads anywhere."""
    if getattr(config, "activation_function", None) == "gelu_new":
        config.activation_function = "gelu_pytorch_tanh"
    return config


def add_adapters(model, lora):
    """LoRA: PEFT freezes the model and adds small trainable matrices beside lora["target_modules"]."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))  # adapters kept in fp32
    model.print_trainable_parameters()
    return model


def train(model, tokenizer, samples, arguments, checkpoint=None, callbacks=(), models_own_loss=False):
    """Train, from `checkpoint` if given; failures that have a known cause stop with what to change.
    models_own_loss: the model's loss instead of causal_lm_loss (the GPU benchmark's "original" settings)."""
    import torch
    from transformers import Trainer, default_data_collator

    validation = samples["validation"] if len(samples["validation"]) else None
    if validation is None:
        arguments.eval_strategy, arguments.eval_on_start = "no", False
        print("No validation samples (the corpus fills one block): validation loss is not measured.")
    trainer = Trainer(
        model=model,
        args=arguments,
        train_dataset=samples["train"],
        eval_dataset=validation,
        processing_class=tokenizer,  # saved to out/ next to the model
        data_collator=default_data_collator,  # samples are already block_size long, with labels: just stack
        callbacks=list(callbacks),  # the GPU benchmark's step timer
        compute_loss_func=None if models_own_loss else causal_lm_loss,  # the model's own loss, in less GPU memory
    )
    arguments.eval_on_start = arguments.eval_on_start and checkpoint is None  # measured before the first run
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        stop("stopped by Ctrl-C (or the launcher)", trainer)
    except torch.OutOfMemoryError:
        fits = largest_batch(gpu_memory_gib(), MODEL["block_size"])
        measured = f" (measured on GPT-J-6B: {fits} fits this {gpu_memory_gib():.0f} GiB card)" if fits else ""
        stop(f"CUDA ran out of GPU memory at per_device_train_batch_size={TRAINING['per_device_train_batch_size']}. "
             f"Lower it{measured} and raise gradient_accumulation_steps to keep the full batch", trainer)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        stop(f"the disk filled up while writing a checkpoint to {FILES['checkpoint_dir']}/. Free some space "
             f"(or lower CHECKPOINTS['keep']) and run it again", trainer)
    except Exception as error:
        if "loss scale already at minimum" not in str(error):
            raise
        stop("FP16 overflowed on every step until DeepSpeed's loss scale hit its minimum (the loss became inf/nan). "
             "Lower TRAINING['learning_rate'], or set TRAINING['bf16'] = True on a card with bf16", trainer)
    return trainer


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """The Trainer's causal-LM loss (each token predicts the next; labels of -100 are skipped; a sum over the
    tokens of the whole accumulated batch divided by num_items_in_batch, else the mean), computed without
    holding fp32 copies of all logits. The model's own loss converts every logit to fp32 and keeps its
    log-softmax, and backward adds two more fp32 copies: with GPT-J's 50,400-token vocabulary that is
    ~1.2 GB a sample of 2048 tokens, most of what a sample costs on the GPU. Here they exist for one chunk
    of tokens at a time."""
    import torch

    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]  # the next token is each one's label
    logits = outputs.logits.flatten(0, 1)
    total = chunked_cross_entropy().apply(logits, labels.flatten().to(logits.device))
    if num_items_in_batch is None:
        return total / (labels != -100).sum()
    return total / (num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)


@functools.cache  # one class, made on first use: torch is imported only when needed
def chunked_cross_entropy():
    import torch

    class ChunkedCrossEntropy(torch.autograd.Function):
        """Summed cross-entropy of logits (tokens x vocabulary, FP16 or fp32) against labels, a chunk of
        tokens at a time in fp32: forward keeps only the logits; backward recomputes each chunk and writes its
        gradient over it, since nothing needs the logits once the loss is known (one logits-sized tensor
        instead of two: ~200 MB a sample less for GPT-J). Same values as F.cross_entropy on fp32 logits."""

        @staticmethod
        def forward(context, logits, labels, chunk_tokens=1024):
            context.save_for_backward(logits, labels)
            context.chunk_tokens = chunk_tokens
            return sum(torch.nn.functional.cross_entropy(rows.float(), targets, ignore_index=-100, reduction="sum")
                       for rows, targets in zip(logits.split(chunk_tokens), labels.split(chunk_tokens)))

        @staticmethod
        def backward(context, grad_total):
            logits, labels = context.saved_tensors
            for rows, targets in zip(logits.split(context.chunk_tokens), labels.split(context.chunk_tokens)):
                with torch.enable_grad():
                    rows32 = rows.detach().float().requires_grad_()
                    loss = torch.nn.functional.cross_entropy(rows32, targets, ignore_index=-100, reduction="sum")
                    rows_grad = torch.autograd.grad(loss, rows32, grad_total)[0]
                rows.copy_(rows_grad)  # the gradient replaces the logits
            return logits, None, None

    return ChunkedCrossEntropy


def stop(reason, trainer):
    """End a failed run with what happened, where the newest checkpoint is, and how to go on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C, or the launcher's SIGTERM, must not cut this short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    newest = find_complete_checkpoints(FILES["checkpoint_dir"])
    where = (f"The newest complete checkpoint is {newest[-1]}: run `deepspeed finetune.py` again to continue from it "
             f"(delete {FILES['checkpoint_dir']}/ to start over)." if newest else
             "There is no checkpoint yet: the next run starts from the beginning.")
    message = f"\nfinetune.py: {reason}. Stopped at optimizer step {trainer.state.global_step}. {where}"
    raise SystemExit(message if trainer.is_local_process_zero() else 1)  # said once, by the first process


def save(trainer, files, metadata):
    """Write the consolidated model + tokenizer beside out/, then swap it in, so that out/ is always a
    complete model: a run killed while saving leaves the previous out/ (and a .partial folder) behind,
    and its checkpoints, to resume from."""
    out_dir = files["out_dir"]
    partial = partial_folder(out_dir)
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier run that was killed while saving
    try:
        # ZeRO-3: every process must take part, since each holds a shard of the weights that is gathered
        # into one 16-bit state dict (stage3_gather_16bit_weights_on_model_save); process 0 writes it.
        if LORA is None:
            trainer.save_model(partial)
        elif trainer.is_world_process_zero():  # the adapters merged in: a plain model, no PEFT needed to load it
            trainer.model.merge_and_unload().save_pretrained(partial)
            trainer.processing_class.save_pretrained(partial)
        if not trainer.is_world_process_zero():
            return
        results = summarize(trainer.state.log_history)
        results["zero_stage"] = trainer.deepspeed.zero_optimization_stage() if trainer.is_deepspeed_enabled else None
        results["dataset"] = {key: metadata[key] for key in ("tokenizer", "block_size", "tokens", "counts", "created")}
        (Path(partial) / "finetune_log.json").write_text(
            json.dumps({**results, "log_history": trainer.state.log_history}, indent=1) + "\n")
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        shutil.rmtree(partial, ignore_errors=True)  # half-written: free its space
        stop(f"the disk filled up while writing the model to {partial}/ (the previous {out_dir}/, if any, is "
             f"untouched). Free some space and run it again", trainer)
    token_split.swap_in(partial, out_dir)
    print(f"\nSaved the fine-tuned model and tokenizer to {out_dir}/ ({time.strftime('%H:%M:%S')}).")
    if Path(files["checkpoint_dir"]).exists():
        shutil.rmtree(files["checkpoint_dir"])  # the run is complete: its checkpoints only take disk space
        print(f"Removed {files['checkpoint_dir']}/: the run is complete.")
    swap_files = Path(OFFLOAD["nvme_path"]) / "zero_stage_3"  # DeepSpeed's folder inside nvme_path
    if optimizer_on_disk() and swap_files.exists():
        shutil.rmtree(swap_files)
        print(f"Removed {swap_files}/: the optimizer state's files.")
    if "validation_loss_after" in results:
        print(f"Validation loss {results['validation_loss_before']:.4f} -> {results['validation_loss_after']:.4f}, "
              f"perplexity {results['validation_perplexity_before']:.2f} -> {results['validation_perplexity_after']:.2f}")


def leave_together():
    """Every process waits until the first has written out/, then the process group is closed: one that
    exits while another still talks to it can abort ("terminate called without an active exception")."""
    import torch.distributed as distributed

    if distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()
    # On CPUs DeepSpeed's shared-memory allreduce leaves a 66 MB buffer in /dev/shm (RAM) per process and never
    # removes it; each run on another port would add one more.
    buffer = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                                 f"{os.environ.get('MASTER_PORT')}_{os.environ.get('RANK')}")
    buffer.unlink(missing_ok=True)


def count_parameters(model_settings):
    """The model's parameter count from its config alone (built on the 'meta' device: no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_settings["name"], revision=model_settings["revision"])
    with torch.device("meta"):
        return sum(parameter.numel() for parameter in AutoModelForCausalLM.from_config(config).parameters())


def pin_host_memory(parameters):
    """OFFLOAD["pin_memory"] decided: "auto" pins when the host RAM holds the pinned peak (MEASURED)."""
    choice = OFFLOAD.get("pin_memory", "auto")
    if choice not in (True, False, "auto"):
        raise SystemExit(f"finetune.py: OFFLOAD['pin_memory'] is {choice!r}; it must be True, False or 'auto'.")
    if not pinning_applies():
        return False
    if choice == "auto":
        return host_ram_needed(parameters, pinned=True) <= host_ram_available()
    return choice


def pinning_applies():
    """Only full fine-tuning with the optimizer state in RAM offloads to host buffers a GPU copies from."""
    return LORA is None and not optimizer_on_disk() and bool(gpu_memory_gib())


def host_ram_available():
    """GiB of host RAM this run can use: PLAN's, else free RAM + free swap now."""
    return PLAN["host_ram_gib"] or (meminfo("MemAvailable") + meminfo("SwapFree")) / 2**30


def check_memory(parameters, block_size, pinned=False):
    """Stop before loading if host RAM or GPU memory cannot hold the run (from MEASURED); else say what it takes."""
    host_available = host_ram_available()
    host_needed = host_ram_needed(parameters, pinned)
    setting = "LoRA" if LORA is not None else \
        f"full fine-tuning, optimizer state {'on disk' if optimizer_on_disk() else 'in RAM'}{', pinned' * pinned}"
    lines = [f"Host RAM: ~{host_needed:.1f} GiB at peak ({setting}), {host_available:.1f} GiB available "
             f"(free RAM + swap)."]
    if not pinned and OFFLOAD.get("pin_memory", "auto") == "auto" and pinning_applies():
        lines.append(f"Not pinned: pinned host memory (faster copies to the GPU: 1.4-1.6x the tokens/s measured) would "
                     f"need ~{host_ram_needed(parameters, pinned=True):.0f} GiB.")
    if host_needed > host_available:
        raise SystemExit(
            f"finetune.py: this run needs ~{host_needed:.0f} GiB of host RAM at its peak ({setting}; measured on "
            f"GPT-J-6B, whatever the batch size), but this machine has {host_available:.0f} GiB (free RAM + swap): "
            f"the kernel's OOM killer would stop the run minutes in. {lower_ram_settings(parameters, host_available, pinned)}")
    gpu = gpu_memory_gib()
    if gpu and abs(parameters / MEASURED["parameters"] - 1) < 0.05:  # measured for GPT-J-6B only
        batch, fits = TRAINING["per_device_train_batch_size"], largest_batch(gpu, block_size)
        if fits is None:
            lines.append(f"GPU memory: {gpu:.1f} GiB on the card; batches were measured on cards of "
                         f"{min(MEASURED['largest_batch'])} GiB and more only.")
            return "\n".join(lines)
        lines.append(f"GPU memory: per_device_train_batch_size={batch}; up to {fits} fit(s) this {gpu:.1f} GiB card "
                     f"({setting}, measured on GPT-J-6B).")
        if batch > fits:
            raise SystemExit(
                f"finetune.py: per_device_train_batch_size={batch} does not fit a {gpu:.1f} GiB GPU ({setting}, "
                f"measured on GPT-J-6B at {block_size} tokens a sample). " +
                (f"Set it to {fits} or less, and raise gradient_accumulation_steps to keep the full batch." if fits else
                 "Not even one sample fits: LoRA keeps the whole FP16 model (11.5 GiB) on the GPU. Set LORA = None "
                 "(full fine-tuning visits the GPU a layer at a time)."))
    return "\n".join(lines)


def host_ram_needed(parameters, pinned=False):
    """GiB of host RAM at peak for the chosen setting (MEASURED), for all of this machine's GPU processes:
    ZeRO-3 splits the optimizer state between them, so a second GPU adds little."""
    if LORA is not None:
        return MEASURED["lora_host_gib"]
    per_parameter = MEASURED["host_bytes_per_parameter_nvme" if optimizer_on_disk() else
                             "host_bytes_per_parameter_pinned" if pinned else "host_bytes_per_parameter"]
    # The launcher's processes on this machine: LOCAL_SIZE (deepspeed) or LOCAL_WORLD_SIZE (torchrun).
    processes = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return per_parameter * parameters / 2**30 + MEASURED["host_gib_per_more_gpu"] * (processes - 1)


def lower_ram_settings(parameters, host_available, pinned=False):
    """What to change when host RAM is short, with the measured cost of each choice."""
    nvme_gib = MEASURED["host_bytes_per_parameter_nvme"] * parameters / 2**30
    speed = MEASURED["tokens_per_s"]
    choices = []
    if pinned and host_ram_needed(parameters) <= host_available:
        choices.append(f"set OFFLOAD['pin_memory'] = 'auto' in finetune.py (not pinned: "
                       f"~{host_ram_needed(parameters):.0f} GiB of RAM, slower copies to the GPU)")
    if LORA is None and OFFLOAD["optimizer"] == "cpu" and nvme_gib <= host_available:
        choices.append(f"set OFFLOAD['optimizer'] = 'nvme' in finetune.py (full fine-tuning with the optimizer state "
                       f"on an SSD: ~{nvme_gib:.0f} GiB of RAM and "
                       f"~{MEASURED['nvme_bytes_per_parameter'] * parameters / 1e9:.0f} GB of disk; measured "
                       f"{speed['nvme']:,} tokens/s against {speed['cpu']:,} in RAM)")
    if LORA is None:
        choices.append(f"set LORA in finetune.py (adapters instead of all weights: ~{MEASURED['lora_host_gib']} GiB "
                       f"of RAM, {speed['lora']:,} tokens/s, but the GPU must hold the 11.5 GiB FP16 model)")
    choices.append("use a machine with more RAM, or add swap (slow, but it runs)")
    return "Either " + "; or ".join(choices) + "."


def largest_batch(gpu_gib, block_size):
    """The largest per-device batch for a card of gpu_gib, from MEASURED (None below the smallest card measured).
    Full fine-tuning: between two measured card sizes, the line between them; above the largest, one more
    sample per gpu_mib_per_sample. A sample's memory grows with its tokens, so shorter blocks fit more."""
    if LORA is not None:
        per_sample = MEASURED["lora_gpu_mib_per_sample"] * block_size / 2048
        return max(0, int((gpu_gib * 1024 - MEASURED["lora_gpu_mib_fixed"]) // per_sample))
    cards = sorted(MEASURED["largest_batch"].items())
    if gpu_gib < cards[0][0]:
        return None
    batch = cards[-1][1] + (gpu_gib - cards[-1][0]) * 1024 / MEASURED["gpu_mib_per_sample"]
    for (small_gib, small_batch), (large_gib, large_batch) in zip(cards, cards[1:]):
        if small_gib <= gpu_gib <= large_gib:
            batch = small_batch + (large_batch - small_batch) * (gpu_gib - small_gib) / (large_gib - small_gib)
            break
    return int(batch * 2048 / block_size + 1e-9)


def gpu_memory_gib():
    """The plan's GPU memory: PLAN's, else this process's card's, else None (no GPU)."""
    import torch

    if PLAN["gpu_memory_gib"] or not torch.cuda.is_available():
        return PLAN["gpu_memory_gib"]
    return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", 0))).total_memory / 2**30


def meminfo(field):
    """A /proc/meminfo field in bytes (Linux)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def check_disk(parameters, files):
    """Stop before training if the disks cannot hold the checkpoints and the final model; else say what they take."""
    import torch

    model_bytes = (2 if torch.cuda.is_available() else 4) * parameters  # FP16 on GPUs, FP32 on CPU
    checkpoint_bytes = CHECKPOINT_BYTES_PER_PARAMETER * parameters if LORA is None else 0.01 * model_bytes  # adapters
    checkpoints_bytes = checkpoint_bytes * (CHECKPOINTS["keep"] + 1) if CHECKPOINTS["every_steps"] else 0
    nvme_bytes = MEASURED["nvme_bytes_per_parameter"] * parameters if optimizer_on_disk() else 0
    parts = [(files["out_dir"], model_bytes, f"the model ({model_bytes / 1e9:.3f} GB)"),
             (files["checkpoint_dir"], checkpoints_bytes,
              f"up to {CHECKPOINTS['keep'] + 1} checkpoints of {checkpoint_bytes / 1e9:.3f} GB"),
             (OFFLOAD["nvme_path"], nvme_bytes, f"the optimizer state's files ({nvme_bytes / 1e9:.3f} GB)")]
    needs = {}  # per disk: (bytes needed, folders, what they hold)
    for folder, size, what in parts:
        if size:
            disk = existing_parent(folder).stat().st_dev
            needed, folders, whats = needs.get(disk, (0, [], []))
            needs[disk] = (needed + size, folders + [folder], whats + [what])
    for needed, folders, whats in needs.values():
        # What the run will replace (old checkpoints, the previous out/, old offload files) counts as free.
        replaced = sum(path.stat().st_size for folder in folders if Path(folder).exists()
                       for path in Path(folder).rglob("*") if path.is_file())
        free = shutil.disk_usage(existing_parent(folders[0])).free + replaced
        if free < needed:
            raise SystemExit(
                f"finetune.py: the disk holding {' and '.join(f + '/' for f in folders)} has {free / 1e9:.3f} GB free, "
                f"but this run needs {needed / 1e9:.3f} GB there: {', '.join(whats)}. Free some space, point FILES "
                f"(or OFFLOAD['nvme_path']) at a larger disk, or set CHECKPOINTS['every_steps'] = None (no resume "
                f"after a crash)."
            )
    offload = f" + {nvme_bytes / 1e9:.1f} GB of optimizer state in {OFFLOAD['nvme_path']}/" if nvme_bytes else ""
    if not CHECKPOINTS["every_steps"]:
        return f"Disk: {model_bytes / 1e9:.1f} GB for the model{offload}; no checkpoints (a killed run starts over)."
    return (f"Disk: {model_bytes / 1e9:.1f} GB for the model{offload}, up to {checkpoints_bytes / 1e9:.1f} GB of "
            f"checkpoints ({CHECKPOINTS['keep'] + 1} x {checkpoint_bytes / 1e9:.1f} GB, every "
            f"{CHECKPOINTS['every_steps']} steps).")


def existing_parent(folder):
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    return path


def run_identity(metadata, arguments):
    """What must not change between a run and its resumption: the data, the model, the settings."""
    return {"dataset": {key: metadata[key] for key in ("created", "tokens", "block_size")},
            "model": MODEL["name"], "training": TRAINING, "lora": LORA, "processes": arguments.world_size,
            "optimizer_state": OFFLOAD["optimizer"]}  # DeepSpeed's checkpoints differ between "cpu" and "nvme"


def find_complete_checkpoints(checkpoint_dir):
    """checkpoint-<step> folders in step order whose trainer_state.json, the last file the Trainer
    writes into a checkpoint (after every process's DeepSpeed shards), exists."""
    folders = sorted(Path(checkpoint_dir).glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    return [str(path) for path in folders if (path / "trainer_state.json").is_file()]


def find_checkpoint(checkpoint_dir, identity, arguments):
    """The newest complete checkpoint of this same run, or None to start from the beginning."""
    folder, first = Path(checkpoint_dir), arguments.local_process_index == 0
    complete = find_complete_checkpoints(checkpoint_dir)
    for path in folder.glob("checkpoint-*"):
        if str(path) not in complete and first:  # being written when the run was killed: never used
            print(f"Removing {path}: an incomplete checkpoint (the run stopped while writing it).")
            shutil.rmtree(path, ignore_errors=True)
    run_file = folder / "run.json"
    if complete and CHECKPOINTS["resume"]:
        if not run_file.is_file() or json.loads(run_file.read_text()) != json.loads(json.dumps(identity)):
            raise SystemExit(
                f"finetune.py: {checkpoint_dir}/ holds checkpoints of a run with another dataset or other settings "
                f"(see {run_file}). Delete {checkpoint_dir}/ to start over, or restore those settings to resume.")
        if first:
            print(f"Resuming from {complete[-1]} (delete {checkpoint_dir}/ to start over instead).")
            if optimizer_on_disk():  # tests/test_resume.py measures the difference
                print("With the optimizer state on disk, DeepSpeed 0.19.8 restores the weights exactly but starts "
                      "Adam's step count over: the run goes on close to, not exactly as, an uninterrupted one.")
        return complete[-1]
    if first:  # starting over: old checkpoints must not be mixed with the new run's
        for path in complete:
            shutil.rmtree(path, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(identity, indent=1) + "\n")
    return None


def clear_stale_build_locks(max_age_s=600):
    """DeepSpeed compiles its ops on first use; a build killed half-way leaves a 'lock' file and every
    later run then waits on it forever, silently. A build takes about a minute: older locks are stale."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    for lock in list(root.glob("*/lock")) + list(root.glob("*/*/lock")):
        if time.time() - lock.stat().st_mtime > max_age_s:
            print(f"Removing {lock}: left by a DeepSpeed op build that was interrupted (it would hang this run).")
            lock.unlink(missing_ok=True)


def summarize(log_history):
    """Validation loss and perplexity before and after training, from the Trainer's log."""
    losses = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    if len(losses) < 2:
        return {}
    return {
        "validation_loss_before": losses[0],
        "validation_loss_after": losses[-1],
        "validation_perplexity_before": math.exp(losses[0]),
        "validation_perplexity_after": math.exp(losses[-1]),
    }


def partial_folder(out_dir):
    return str(Path(out_dir)) + ".partial"


if __name__ == "__main__":
    main()
