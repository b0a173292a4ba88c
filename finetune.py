"""Fine-tune GPT-J-6B on the dataset token_split.py wrote, with the HF Trainer and DeepSpeed ZeRO-3.

    deepspeed finetune.py                    # every GPU of this machine
    deepspeed --num_gpus 1 finetune.py       # one GPU

Every option is in the dicts below; the DeepSpeed settings are in ds_config.py. The lines a reader
comes for are marked `# ZeRO-3:`, `# FP16:` and `# LoRA:`. Each helper beside this file does one job:
plan.py (what the run needs against what the machine has), artifacts.py (the folders the scripts
hand each other), checkpoints.py (resume), failures.py (errors that say what to do), memory_savers.py.
"""

import gc
import os
import shutil

import torch
from datasets import load_from_disk
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments,
                          default_data_collator, set_seed)
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import artifacts
import checkpoints
import ds_config
import failures
import memory_savers
import plan

MODEL = {
    "name": "EleutherAI/gpt-j-6B",  # hub name or local folder; the tokenizer comes from there too
    "revision": "float16",  # hub branch: GPT-J's FP16 weights, a 12 GB download instead of 24 GB
}

# Where weights and optimizer state live. "auto" picks, before anything loads, the first of these that
# fits this machine and prints what the others need; a name forces one (README: "Which set-up").
#   "gpu"         full fine-tuning, nothing offloaded: the GPUs hold it all (~16 bytes a parameter)
#   "ram-pinned"  full fine-tuning; weights and optimizer state in page-locked RAM (fastest offload)
#   "ram"         the same in ordinary RAM
#   "lora"        LoRA adapters (LORA below) beside a frozen FP16 model that the GPUs hold
#   "lora-ram"    the same with the frozen model in RAM, streamed through the GPU: for small cards
#   "disk"        full fine-tuning, optimizer state in files (FILES["offload_dir"]): least RAM, slow
SETUP = "auto"

# LoRA set-ups only (PEFT): small trainable matrices beside these layers, merged into out/ at the end
LORA = {
    "r": 16,  # rank of each adapter: more = more capacity and memory
    "lora_alpha": 32,  # adapter scale (alpha / r)
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],  # GPT-J's attention query and value projections
}

FILES = {
    "dataset_dir": "data/tokenized",  # written by `python token_split.py`
    "out_dir": "out",  # the fine-tuned FP16 model + tokenizer; replaced only by a complete new one
    "checkpoint_dir": "checkpoints",  # resumable training state; removed once out/ is complete
    "offload_dir": "nvme_offload",  # SETUP "disk": a folder on your fastest SSD; emptied at the end
}

# A killed run (OOM killer, power cut, Ctrl-C) resumes from its newest complete checkpoint when rerun.
CHECKPOINTS = {
    "every_steps": 20,  # optimizer steps between checkpoints (None = never); GPT-J: ~97 GB each
    "keep": 1,  # newest checkpoints kept; one more exists while the next is being written
    "resume": True,  # False: start over even if checkpoint_dir holds checkpoints of this run
}

# The machine to plan for: None = this one (free RAM + swap, the GPU's memory); numbers: another one.
MACHINE = {"host_ram_gib": None, "gpu_memory_gib": None}

# Passed straight to transformers.TrainingArguments.
TRAINING = {
    "per_device_train_batch_size": 1,  # samples per GPU per micro-step; the plan says how many fit
    "per_device_eval_batch_size": 1,  # costs as much per sample as training; larger only evaluates faster
    "gradient_accumulation_steps": 8,  # micro-steps per optimizer step; costs time, not memory
    "num_train_epochs": 1,  # passes over the training samples
    "learning_rate": 1e-5,  # peak LR; a 6B model wants small steps (FP16 overflows above ~1e-4)
    "lr_scheduler_type": "cosine",  # decays to 0 at the last step, however few steps there are
    "warmup_steps": 0,  # optimizer steps of linear warm-up from LR 0 (a fraction of all steps if < 1)
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,  # gradient clipping
    "bf16": False,  # bf16 instead of FP16 on cards that have it (RTX 30xx+, A100, H100): no overflows
    "activation_checkpointing": True,  # recompute activations in backward: ~20 GiB less a GPT-J sample
    "logging_steps": 1,  # print loss and LR every optimizer step
    "seed": 42,  # model-side randomness (data order, dropout); same seed, same run
}


def main():
    # The CUDA allocator grows segments instead of leaving unusable gaps: more samples fit (bench/).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    failures.prepare()  # the launcher's SIGTERM is handled like Ctrl-C; stale build locks go
    facts = artifacts.read_dataset_facts(FILES["dataset_dir"])  # missing or half-written: says so
    config = AutoConfig.from_pretrained(MODEL["name"], revision=MODEL["revision"])
    tokenizer = load_tokenizer(facts, config)
    setup, disk_plan = plan_run(config, facts)  # stops here if the machine cannot hold the run
    arguments = training_arguments(ds_config.deepspeed_config(setup, FILES["offload_dir"]))
    samples = load_from_disk(FILES["dataset_dir"])
    run = checkpoints.run_identity(facts, MODEL["name"], TRAINING, setup, LORA, arguments.world_size)
    checkpoint = checkpoints.resume_point(FILES["checkpoint_dir"], run, CHECKPOINTS["resume"],
                                          arguments.local_process_index == 0)
    if arguments.process_index == 0:
        train_samples, gpus = len(samples["train"]), arguments.world_size
        print(plan.batch_plan(train_samples, TRAINING, gpus, facts["block_size"]))
        print(f"{setup['report']}\n{disk_plan}")
    memory_savers.lean_zero3_overflow_check()  # ZeRO-3: ~17 GiB less host RAM at each optimizer step
    model = load_model(config, setup, arguments)
    trainer = train(model, tokenizer, samples, arguments, checkpoint, setup["largest_batch"])
    del model  # the trainer holds it; LoRA's save needs its RAM back
    save(trainer, facts, setup)
    failures.leave_together()  # every process waits for out/, then the process group closes


def load_tokenizer(facts, config):
    """The model's tokenizer, checked against the dataset's (and saved to out/ with the model)."""
    tokenizer = AutoTokenizer.from_pretrained(MODEL["name"], revision=MODEL["revision"])
    artifacts.check_dataset(facts, tokenizer, MODEL["name"], config.max_position_embeddings)
    return tokenizer


def plan_run(config, facts):
    """The set-up for this machine and the disk it needs, from measured figures, before any weights load."""
    parameters, batch = plan.count_parameters(config), TRAINING["per_device_train_batch_size"]
    setup = plan.choose_setup(SETUP, parameters, facts["block_size"], batch, plan.this_machine(MACHINE))
    return setup, plan.check_disk(parameters, setup, FILES, CHECKPOINTS, torch.cuda.is_available())


def training_arguments(deepspeed_config):
    """TrainingArguments from TRAINING; deepspeed_config=None trains without DeepSpeed (the tests)."""
    on_gpu = torch.cuda.is_available()
    if deepspeed_config is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        import deepspeed

        deepspeed.init_distributed()  # several CPU processes need it before TrainingArguments
    return TrainingArguments(
        output_dir=FILES["checkpoint_dir"],  # where the Trainer writes checkpoint-<step>/ folders
        # ZeRO-3: TrainingArguments made with a ZeRO-3 config make from_pretrained build the model
        # already partitioned (deepspeed.zero.Init): no process ever holds all 12 GB of weights.
        deepspeed=deepspeed_config,
        fp16=on_gpu and not TRAINING["bf16"],  # FP16: on GPUs; CPUs have no FP16 kernels: FP32
        use_cpu=not on_gpu,
        eval_strategy="epoch",  # validation loss after every epoch ...
        eval_on_start=True,  # ... and once before the first step, to compare against
        save_strategy="steps" if CHECKPOINTS["every_steps"] else "no",  # out/ is written by save()
        save_steps=CHECKPOINTS["every_steps"] or 1,
        save_total_limit=CHECKPOINTS["keep"],
        report_to="none",  # no account-based trackers; the log goes to out/finetune_log.json
        **TRAINING,
    )


def load_model(config, setup, arguments):
    """GPT-J in FP16 on GPUs (FP32 on CPU), partitioned by ZeRO-3 as it loads; LoRA adds adapters."""
    config.use_cache = False  # the generation cache is of no use in training, and clashes with checkpointing
    model = AutoModelForCausalLM.from_pretrained(
        MODEL["name"],
        revision=MODEL["revision"],
        config=memory_savers.one_kernel_gelu(config),  # same function, less GPU memory per sample
        # FP16: 2 bytes a parameter, 12 GB for GPT-J (the hub's float16 branch holds exactly these).
        dtype=torch.float16 if arguments.fp16 else torch.bfloat16 if arguments.bf16 else torch.float32,
    )
    if not setup["lora"]:
        return model
    set_seed(arguments.seed)  # LoRA: the adapters start random; same seed, same run
    # LoRA: adapters in the model's FP16, so that DeepSpeed scales the loss and keeps fp32 master copies.
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA), autocast_adapter_dtype=False)
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
        model=model,
        args=arguments,
        train_dataset=samples["train"],
        eval_dataset=validation,
        processing_class=tokenizer,  # saved to out/ next to the model
        data_collator=default_data_collator,  # samples are block_size long, with labels: just stacked
        callbacks=[memory_savers.ReturnCachedPinnedMemory(), *callbacks],  # + the GPU benchmark's timer
        compute_loss_func=loss,  # the model's own loss in less GPU memory (None: the model's own)
    )
    arguments.eval_on_start = arguments.eval_on_start and checkpoint is None  # once, before step 1
    batch = TRAINING["per_device_train_batch_size"]
    with failures.explained(trainer, FILES["checkpoint_dir"], batch, largest_batch):
        trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def save(trainer, facts, setup):
    """Write the consolidated model + tokenizer beside out/, then swap it in: out/ is always a complete
    model, and a run killed while saving leaves the previous out/ and its checkpoints to resume from."""
    partial = artifacts.partial_path(FILES["out_dir"])
    first = trainer.is_world_process_zero()
    zero_stage = trainer.deepspeed.zero_optimization_stage() if trainer.is_deepspeed_enabled else None
    with failures.disk_full_while_saving(trainer, partial, FILES["out_dir"], FILES["checkpoint_dir"]):
        if first:
            shutil.rmtree(partial, ignore_errors=True)  # left by a run that was killed while saving
        # ZeRO-3: every process takes part, each holding a shard of the weights that are gathered
        # into one 16-bit state dict (stage3_gather_16bit_weights_on_model_save); process 0 saves.
        memory_savers.drop_optimizer_state(trainer)  # the final checkpoint holds it: room to gather
        trainer.save_model(partial / "lora_adapter" if setup["lora"] else partial)  # LoRA: adapters only
        if not first:
            return
        if setup["lora"]:
            merge_adapters(trainer, partial)
        log = artifacts.write_training_log(partial, trainer.state.log_history, facts, zero_stage=zero_stage)
    artifacts.swap_in(partial, FILES["out_dir"])
    print(f"\nSaved the fine-tuned model and tokenizer to {FILES['out_dir']}/. {log}")
    offload_dir = FILES["offload_dir"] if setup["name"] == "disk" else None
    checkpoints.remove_finished(FILES["checkpoint_dir"], offload_dir)



def merge_adapters(trainer, partial):
    """LoRA: the adapters merged into the base model, out/ a plain FP16 model that loads without PEFT.
    DeepSpeed's copy of the model goes first; the base model is read again, outside ZeRO-3."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.deepspeed = trainer.optimizer = None
    gc.collect()
    unset_hf_deepspeed_config()  # from_pretrained would build a partitioned model again
    dtype = torch.float16 if trainer.args.fp16 else torch.bfloat16 if trainer.args.bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(MODEL["name"], revision=MODEL["revision"], dtype=dtype)
    merged = PeftModel.from_pretrained(base, partial / "lora_adapter").merge_and_unload()
    merged.save_pretrained(partial)
    trainer.processing_class.save_pretrained(partial)


if __name__ == "__main__":
    main()
