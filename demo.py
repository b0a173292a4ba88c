"""The whole trio end to end on a CPU, with no network: a few minutes on 2 cores.

    python demo.py

It builds a tiny GPT-J and tokenizer from the sample texts in demo/text/ (your own text/ is not
touched), then runs the three scripts with their settings pointed at demo/work/:
token_split.py -> `deepspeed finetune.py` (ZeRO-3, through DeepSpeed's launcher) -> infer_test.py.
"""

import os
import subprocess
import sys
import time

import psutil

import failures
import finetune
import infer_test
import tiny_gptj
import token_split

DEMO = {
    "text_dir": "demo/text",  # sample corpus shipped with the repo
    "work_dir": "demo/work",  # tiny model, dataset and fine-tuned model go here (git-ignored)
    "block_size": 128,  # the tiny model's context is 256
}


def use_demo_settings():
    """Point the three scripts' settings at the tiny model and demo folders (in every process)."""
    work = DEMO["work_dir"]
    token_split.SETTINGS.update(text_dir=DEMO["text_dir"], dataset_dir=f"{work}/dataset",
                                tokenizer=f"{work}/tiny-gptj", block_size=DEMO["block_size"],
                                validation_share=0.1)
    finetune.MODEL.update(name=f"{work}/tiny-gptj", revision=None)
    finetune.FILES.update(dataset_dir=f"{work}/dataset", out_dir=f"{work}/out",
                          checkpoint_dir=f"{work}/checkpoints")
    finetune.TRAINING.update(
        per_device_train_batch_size=4, per_device_eval_batch_size=8, gradient_accumulation_steps=2,
        num_train_epochs=12,  # 3,700 tokens: many passes, a second each (more overfits: validation loss rises)
        learning_rate=3e-3,  # a random tiny model learns from scratch: far higher than GPT-J's 1e-5
        logging_steps=10,
        disable_tqdm=True,  # the Trainer's logs as lines: no progress bars, nor eval's inside them
    )
    infer_test.SETTINGS.update(model_dir=f"{work}/out", max_new_tokens=40,
                               prompts=["12 March. Wind", "Dear Anna,", "Bread asks for"])


def main():
    started = time.time()
    use_demo_settings()
    quiet_progress_bars()
    print("== 1/4 building a tiny GPT-J and its tokenizer from demo/text (instead of downloading GPT-J-6B)")
    tiny_gptj.build(DEMO["text_dir"], token_split.SETTINGS["tokenizer"])
    print("\n== 2/4 python token_split.py")
    token_split.main()
    print("\n== 3/4 deepspeed finetune.py")
    run_finetune_with_launcher()
    print("\n== 4/4 python infer_test.py")
    infer_test.main()
    out_dir = finetune.FILES["out_dir"]
    print(f"\nDemo finished in {time.time() - started:.0f} s. The fine-tuned model is in "
          f"{out_dir}/.")
    print(f"Sample from it again, with infer_test.py's own prompts: python infer_test.py {out_dir}")
    print(f"Its loss curves: {out_dir}/loss.png, and `tensorboard --logdir {out_dir}/tensorboard`.")


def run_finetune_with_launcher():
    """`deepspeed --num_gpus 1 demo.py finetune`: the launcher starts this file again, in finetune mode."""
    environment = dict(os.environ, HF_HUB_DISABLE_PROGRESS_BARS="1")  # transformers' bars too
    environment.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    environment.setdefault("DS_ACCELERATOR", "cpu" if not cuda_available() else "cuda")
    if not cuda_available():  # the threads Accelerate picks on CPUs, set, not warned about
        environment.setdefault("OMP_NUM_THREADS", str(psutil.cpu_count(logical=False) or 1))
    # -q: the launcher's own lines (its command, ranks, "Unable to find hostfile") only on errors
    command = ["deepspeed", "-q", "--num_gpus", "1", "--master_port", str(failures.free_port()), __file__,
               "finetune"]
    subprocess.run(command, env=environment, check=True)


def quiet_progress_bars():
    """No progress bars in this process (writing the tiny model, reading the demo's out/): a run
    of seconds, and the lines around them stay readable."""
    import datasets
    import transformers

    transformers.logging.disable_progress_bar()  # huggingface_hub's bars with them
    datasets.disable_progress_bars()


def cuda_available():
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    if "finetune" in sys.argv[1:]:  # started by the launcher (which adds --local_rank=N)
        use_demo_settings()
        finetune.main()
    else:
        main()
