"""Fine-tune GPT-J-6B on the dataset token_split.py wrote, with the HF Trainer and DeepSpeed ZeRO-3.

    deepspeed finetune.py                    # every GPU of this machine
    deepspeed --num_gpus 1 finetune.py       # one GPU

Every option is in the dicts below. The DeepSpeed settings are in ds_config.py. The lines that are
specific to ZeRO-3 or FP16 are marked with `# ZeRO-3:` and `# FP16:`.
"""

import json
import math
import os
import shutil
import time
from pathlib import Path

import token_split
from ds_config import DS_CONFIG

MODEL = {
    "name": "EleutherAI/gpt-j-6B",  # hub name or local folder (the tokenizer comes from the same place)
    "revision": "float16",  # hub branch: GPT-J's FP16 weights, a 12 GB download instead of 24 GB
    "block_size": 2048,  # tokens per sample; the dataset must have been cut to it (token_split.py)
}

FILES = {
    "dataset_dir": token_split.SETTINGS["dataset_dir"],  # written by `python token_split.py`
    "out_dir": "out",  # the fine-tuned FP16 model + tokenizer; replaced only once a new one is complete
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
    metadata = check_dataset(FILES["dataset_dir"], MODEL)  # fails fast, before anything is loaded
    tokenizer = load_tokenizer(MODEL, metadata)
    arguments = training_arguments(DS_CONFIG)  # ZeRO-3: before the model, see load_model
    samples = load_samples(FILES["dataset_dir"])
    if arguments.process_index == 0:
        print(batch_plan(len(samples["train"]), TRAINING, arguments.world_size, MODEL["block_size"]))
    model = load_model(MODEL, arguments)
    trainer = train(model, tokenizer, samples, arguments)
    save(trainer, FILES["out_dir"], metadata)


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
    probe = tokenizer("Hello world, naïve café 123\n", add_special_tokens=False)["input_ids"]
    if (len(tokenizer), tokenizer.eos_token_id, probe) != (
            metadata["vocab_size"], metadata["eos_token_id"], metadata["tokenizer_probe"]):
        raise SystemExit(
            f"finetune.py: the dataset was tokenized with '{metadata['tokenizer']}' ({metadata['vocab_size']} tokens), "
            f"which is not the tokenizer of '{model_settings['name']}' ({len(tokenizer)} tokens). Set token_split.py's "
            f"tokenizer to '{model_settings['name']}' and re-run `python token_split.py`."
        )
    return tokenizer


def training_arguments(ds_config):
    """TrainingArguments from TRAINING. ds_config=None trains without DeepSpeed (the tests compare both)."""
    import torch
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    if ds_config is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        import deepspeed

        deepspeed.init_distributed()  # several CPU processes need the process group before TrainingArguments
    return TrainingArguments(
        output_dir=partial_folder(FILES["out_dir"]),  # the Trainer's scratch space; becomes out/ at the end
        # ZeRO-3: creating TrainingArguments with a ZeRO-3 config makes from_pretrained build the model
        # already partitioned (deepspeed.zero.Init), so no process ever holds all 12 GB of weights.
        deepspeed=ds_config,
        fp16=on_gpu and not TRAINING["bf16"],  # FP16: on GPUs; CPUs have no FP16 kernels, so FP32 there
        use_cpu=not on_gpu,
        eval_strategy="epoch",  # validation loss after every epoch ...
        eval_on_start=True,  # ... and once before the first step, to compare against
        save_strategy="no",  # the model is saved once, at the end (see save)
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
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_settings["name"],
        revision=model_settings["revision"],
        # FP16: 2 bytes a parameter, 12 GB for GPT-J (the hub's float16 branch holds exactly these).
        dtype=torch.float16 if arguments.fp16 else torch.bfloat16 if arguments.bf16 else torch.float32,
        use_cache=False,  # the generation cache is useless in training and clashes with gradient checkpointing
    )
    return model


def train(model, tokenizer, samples, arguments, callbacks=()):
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
    )
    trainer.train()
    return trainer


def save(trainer, out_dir, metadata):
    """Write the consolidated model + tokenizer beside out/, then swap it in, so that out/ is always a
    complete model: a run killed while saving leaves the previous out/ (and a .partial folder) behind."""
    partial = partial_folder(out_dir)
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)  # left by an earlier run that was killed while saving
    # ZeRO-3: every process must take part, since each holds a shard of the weights that is gathered
    # into one 16-bit state dict (stage3_gather_16bit_weights_on_model_save); process 0 writes it.
    trainer.save_model(partial)
    if not trainer.is_world_process_zero():
        return
    results = summarize(trainer.state.log_history)
    results["zero_stage"] = trainer.deepspeed.zero_optimization_stage() if trainer.is_deepspeed_enabled else None
    results["dataset"] = {key: metadata[key] for key in ("tokenizer", "block_size", "tokens", "counts", "created")}
    (Path(partial) / "finetune_log.json").write_text(
        json.dumps({**results, "log_history": trainer.state.log_history}, indent=1) + "\n")
    old = Path(out_dir + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if Path(out_dir).exists():
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    print(f"\nSaved the fine-tuned model and tokenizer to {out_dir}/ ({time.strftime('%H:%M:%S')}).")
    if "validation_loss_after" in results:
        print(f"Validation loss {results['validation_loss_before']:.4f} -> {results['validation_loss_after']:.4f}, "
              f"perplexity {results['validation_perplexity_before']:.2f} -> {results['validation_perplexity_after']:.2f}")


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
