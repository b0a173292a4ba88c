"""Fine-tune GPT-J-6B on the dataset token_split.py wrote, with the HF Trainer and DeepSpeed ZeRO-3.

    deepspeed finetune.py                    # every GPU of this machine (--num_gpus 1: one)

Every option is in the dicts below, DeepSpeed's in ds_config.py; `# ZeRO-3:`, `# FP16:`, `# LoRA:`
mark the lines specific to them. Helpers, one job each: plan, artifacts, checkpoints, failures, ...
"""

import os

import deepspeed
import torch
from datasets import load_from_disk
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer,
                          TrainingArguments, default_data_collator, set_seed)

import artifacts
import checkpoints
import curves
import ds_config
import failures
import fp8
import memory_savers
import plan

MODEL = {
    "name": "EleutherAI/gpt-j-6B",  # hub name or local folder; the tokenizer comes from there too
    "revision": "float16",  # hub branch: GPT-J's FP16 weights, a 12 GB download instead of 24 GB
}

# Where weights and optimizer state live. "auto" picks, before anything loads, full fine-tuning where
# it fits, else LoRA, the fastest on this card, and says why; a name forces one (README). Full: "gpu"
# (nothing offloaded), "ram-pinned", "ram-optimizer" (weights on the GPU), "ram" (offloaded to RAM),
# "disk" (optimizer state in FILES["offload_dir"]: least RAM, slow). LoRA (LORA below) beside a
# frozen model that the GPUs hold, "lora" (ZeRO-2), or RAM holds and streams to them, "lora-ram".
SETUP = "auto"

LORA = {  # LoRA set-ups (PEFT): small trainable matrices beside these layers, merged at the end
    "task_type": "CAUSAL_LM",
    "r": 16,  # rank of each adapter: more = more capacity and memory
    "lora_alpha": 32,  # adapter scale (alpha / r)
    "lora_dropout": 0.0,  # PEFT's default; 0.05 costs 2% of the speed (bench/RESULTS.md)
    "target_modules": ["q_proj", "v_proj"],  # GPT-J's attention query and value projections
}
# LoRA set-ups: these replace TRAINING's; a few adapters that start at zero want far larger steps
LORA_TRAINING = {"learning_rate": 2e-4}

FILES = {
    "dataset_dir": "data/tokenized",  # written by `python token_split.py`
    "out_dir": "out",  # the fine-tuned FP16 model + tokenizer; replaced only by a complete new one
    "checkpoint_dir": "checkpoints",  # resumable training state; removed once out/ is complete
    "offload_dir": "nvme_offload",  # SETUP "disk": a folder on your fastest SSD; emptied at the end
}

CHECKPOINTS = {  # a killed run (OOM killer, power cut, Ctrl-C) resumes from the newest when rerun
    "every_steps": 20,  # optimizer steps between checkpoints (None = never); GPT-J: ~97 GB each
    "keep": 1,  # newest checkpoints kept; one more exists while the next is being written
    "resume": True,  # False: start over even if checkpoint_dir holds checkpoints of this run
}

MACHINE = {  # the machine to plan for; None: this machine's
    "host_ram_gib": None,
    "gpu_memory_gib": None,
    "gpu": None,  # a card of speed.CARDS, e.g. "RTX 4090": its memory and speed (no GPU needed)
    "cpu_threads": None,  # CPU Adam's step scales with them
}

# Full fine-tuning in bf16 on a card with FP8 (RTX 40xx/50xx, H100, H200): each block's Linear layers multiply
# in FP8 (torchao, compiled): micro-steps ~18% shorter, validation loss within 0.1% of bf16's (README)
FP8 = False

# Samples (of block_size tokens) per optimizer step, all GPUs together: 64 x 2048 = 131,072 tokens.
# Fewer give more, noisier steps (a 5 MB corpus, ~600 samples, makes ~10 an epoch at 64); more
# spread CPU Adam's ~6 s step over more micro-steps (faster where the optimizer state is in RAM).
FULL_BATCH = 64

TRAINING = {  # passed straight to transformers.TrainingArguments
    "per_device_train_batch_size": "auto",  # samples per GPU per micro-step; auto: the most that fit
    "per_device_eval_batch_size": "auto",  # auto: as the training batch (an eval sample costs less)
    "gradient_accumulation_steps": "auto",  # micro-steps per optimizer step; auto: makes FULL_BATCH
    "num_train_epochs": 1,  # passes over the training samples
    "learning_rate": 1e-5,  # peak LR of full FT: all 6B weights move (FP16 overflows above ~1e-4)
    "lr_scheduler_type": "cosine",  # decays to 0 at the last step, however few steps there are
    "warmup_steps": 0,  # optimizer steps of linear warm-up from LR 0 (if < 1: a fraction of all)
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,  # gradient clipping
    "bf16": False,  # bf16, not FP16, on cards that have it (RTX 30xx+, A100, H100): no overflows
    "activation_checkpointing": True,  # recompute activations in backward: ~20 GiB less a sample
    "logging_steps": 1,  # print loss and LR every optimizer step
    "seed": 42,  # model-side randomness (data order, dropout); same seed, same run
}


def main():
    memory_savers.install()  # ZeRO-3: less host RAM a step; a CUDA allocator that fits more samples
    failures.prepare()  # the launcher's SIGTERM is handled like Ctrl-C; stale build locks go
    facts = artifacts.read_dataset_facts(FILES["dataset_dir"])  # missing or half-written: says so
    with failures.model_within_reach(MODEL["name"]):  # from the hub or a folder: says if neither
        config = AutoConfig.from_pretrained(MODEL["name"], revision=MODEL["revision"])
        tokenizer = AutoTokenizer.from_pretrained(MODEL["name"], revision=MODEL["revision"])
    artifacts.check_dataset(facts, tokenizer, MODEL["name"], config.max_position_embeddings)
    # The set-up and the disk the run needs, from measured figures: stops here if they do not fit.
    parameters, machine = plan.count_parameters(config), plan.this_machine(MACHINE)
    setup = plan.choose_setup(SETUP, parameters, facts, TRAINING, FULL_BATCH, machine, FP8)
    # LoRA: its own learning rate; "auto" batch settings: the numbers the plan chose
    training = {**TRAINING, **(LORA_TRAINING if setup["lora"] else {}), **setup["batch_settings"]}
    disk_plan = plan.check_disk(parameters, setup, FILES, CHECKPOINTS, torch.cuda.is_available())
    artifacts.check_replaceable(FILES["out_dir"], "finetune.py", "FILES['out_dir']")  # or stops
    arguments = training_arguments(ds_config.deepspeed_config(setup, FILES["offload_dir"]), training)
    samples = load_from_disk(FILES["dataset_dir"])
    gpus, first = arguments.world_size, arguments.process_index == 0  # shared checkpoint_dir
    run = checkpoints.run_identity(facts, MODEL["name"], training, setup, LORA, gpus)
    checkpoints.shared_by_all_machines(FILES["checkpoint_dir"], CHECKPOINTS)  # or stops, saying so
    checkpoint = checkpoints.resume_point(FILES["checkpoint_dir"], run, CHECKPOINTS, first)
    if arguments.process_index == 0:
        print(plan.batch_plan(len(samples["train"]), training, gpus, facts["block_size"]))
        print(f"{setup['report']}\n{disk_plan}")
    model = load_model(config, setup, arguments)
    trainer = train(model, tokenizer, samples, arguments, checkpoint, setup["largest_batch"])
    save(trainer, facts, setup)
    failures.leave_together()  # every process waits for out/, then all end together


def training_arguments(deepspeed_config, training):
    """TrainingArguments from `training` (TRAINING, LoRA's LR in); deepspeed_config=None: no DeepSpeed."""
    if deepspeed_config is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        deepspeed.init_distributed()  # several CPU processes need it before TrainingArguments
    return TrainingArguments(
        output_dir=FILES["checkpoint_dir"],  # where the Trainer writes checkpoint-<step>/ folders
        # ZeRO-3: TrainingArguments made with a ZeRO-3 config make from_pretrained build the model
        # already partitioned (deepspeed.zero.Init): no process holds all 12 GB (LoRA's ZeRO-2 does)
        deepspeed=deepspeed_config,
        fp16=torch.cuda.is_available() and not training["bf16"],  # FP16: on GPUs; on CPUs FP32
        use_cpu=not torch.cuda.is_available(),
        eval_strategy="epoch",  # validation loss after every epoch ...
        eval_on_start=True,  # ... and once before the first step, to compare against
        save_strategy="steps" if CHECKPOINTS["every_steps"] else "no",  # out/ is written by save()
        save_steps=CHECKPOINTS["every_steps"] or 1,
        save_total_limit=CHECKPOINTS["keep"],
        report_to="tensorboard",  # + out/finetune_log.json and loss.png; no account-based trackers
        **training,
    )


def load_model(config, setup, arguments):
    """GPT-J in FP16 on GPUs (FP32 on CPU), partitioned under ZeRO-3 as it loads; + FP8's or LoRA's layers."""
    config.use_cache = False  # the generation cache: no use in training, clashes with checkpointing
    # FP16: 2 bytes a parameter, 12 GB for GPT-J (the hub's float16 branch holds exactly these).
    dtype = torch.float16 if arguments.fp16 else torch.bfloat16 if arguments.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        MODEL["name"], revision=MODEL["revision"], dtype=dtype,
        config=memory_savers.one_kernel_gelu(config),  # same function, less GPU memory per sample
    )
    if setup["fp8"]:  # FP8 = True, and the plan found that it applies
        model = fp8.blocks_in_fp8(model)
    if not setup["lora"]:
        return model
    set_seed(arguments.seed)  # LoRA: the adapters start random; same seed, same run
    # LoRA: adapters in the model's FP16, so that DeepSpeed scales the loss and keeps fp32 masters.
    model = get_peft_model(model, LoraConfig(**LORA), autocast_adapter_dtype=False)
    model.print_trainable_parameters()
    return model


def train(model, tokenizer, samples, arguments, checkpoint=None, largest_batch=None, callbacks=(),
          loss=memory_savers.causal_lm_loss):
    """Train, from `checkpoint` if given; a failure with a known cause stops with what to change."""
    validation = samples["validation"] if len(samples["validation"]) else None
    if validation is None:
        arguments.eval_strategy, arguments.eval_on_start = "no", False
        print("No validation samples (the corpus fills one block): no validation loss is measured.")
    trainer = Trainer(
        model=model, args=arguments, train_dataset=samples["train"], eval_dataset=validation,
        processing_class=tokenizer,  # saved to out/ next to the model
        data_collator=default_data_collator,  # samples are block_size long, with labels: stacked
        callbacks=[memory_savers.ReturnCachedPinnedMemory(), checkpoints.EveryStepsOnly(),
                   *callbacks],  # + the benchmark's timer
        compute_loss_func=loss,  # the model's own loss in less GPU memory (None: the model's own)
    )
    arguments.eval_on_start = arguments.eval_on_start and checkpoint is None  # once, before step 1
    with failures.explained(trainer, FILES["checkpoint_dir"], arguments.to_dict(), largest_batch):
        trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def save(trainer, facts, setup):
    """The consolidated model + tokenizer, written beside out/ and swapped in: out/ is whole."""
    partial = artifacts.partial_path(FILES["out_dir"])
    zero_stage = trainer.deepspeed.zero_optimization_stage() if trainer.is_deepspeed_enabled else 0
    with failures.disk_full_while_saving(trainer, partial, FILES):
        if trainer.is_world_process_zero():  # empty, beside out/ (as token_split's dataset)
            artifacts.start_partial(FILES["out_dir"], "finetune.py", "FILES['out_dir']")
        # ZeRO-3: every process takes part, each holding a shard of the weights that are gathered
        # into one 16-bit state dict (stage3_gather_16bit_weights_on_model_save); process 0 saves.
        memory_savers.drop_optimizer_state(trainer)  # training is over: room to gather
        trainer.save_model(partial / "lora_adapter" if setup["lora"] else partial)  # LoRA: adapters
        if not trainer.is_world_process_zero():
            return
        if setup["lora"]:
            memory_savers.drop_model(trainer)  # DeepSpeed's copy of the model goes first
            merge_adapters(partial)
            trainer.processing_class.save_pretrained(partial)
        history = trainer.state.log_history
        log = artifacts.write_training_log(partial, history, facts, zero_stage=zero_stage)
        curves.save(partial, history, FILES["checkpoint_dir"])  # TensorBoard's files and loss.png
    artifacts.swap_in(partial, FILES["out_dir"])
    print(f"\nSaved the fine-tuned model and tokenizer to {FILES['out_dir']}/. {log}")
    checkpoints.remove_finished(FILES["checkpoint_dir"], FILES["offload_dir"])


def merge_adapters(partial):
    """LoRA: the adapters merged into the base model, read again outside ZeRO-3: a plain model."""
    base = AutoModelForCausalLM.from_pretrained(MODEL["name"], revision=MODEL["revision"])
    merged = PeftModel.from_pretrained(base, partial / "lora_adapter").merge_and_unload()
    merged.save_pretrained(partial)


if __name__ == "__main__":
    main()
