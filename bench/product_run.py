"""GPT-J-6B at full size through the product's own commands, on the GPU machine: the plan's estimate of a
run's time against the run's measured time, and the host RAM that loading each weights format takes.

    python3 bench/product_run.py make [MB] [PICKLE] [LAYERS]  # corpus, BPE, random FP16 GPT-J-6B (PICKLE 0:
                                                      # safetensors only; LAYERS: fewer blocks, same width), dataset
    python3 bench/product_run.py load FORMAT SETUP    # finetune.load_model() reading that folder: host peak, time
    python3 bench/product_run.py run SETUP [GIB]      # `deepspeed finetune.py`, the GPU capped to GIB
    python3 bench/product_run.py state VARIANT [GIB] [EPOCHS] [SETUP] [BATCH]  # one optimizer state in bf16:
                                                      # exact, bf16-master, bf16-master-states, fp8-compile (issue
                                                      # #28); ram-optimizer unless SETUP; GIB 0: the whole card;
                                                      # BATCH: per device (else the plan's), 16 a step

The hub is out of reach: the model is GPTJConfig() (GPT-J-6B's shape) with random FP16 weights, saved as
safetensors (`save_pretrained`'s default) and as a PyTorch pickle (`safe_serialization=False`); the text is
the machine's own Python sources, with a byte-level BPE of 8,192 entries trained on them (real text, so
that the losses mean something). A GPU of GIB is emulated by capping PyTorch's allocator in each rank (a
sitecustomize.py on PYTHONPATH) and telling the plan (MACHINE["gpu_memory_gib"]). Records are appended to
bench/results.json ($BENCH_RESULTS).
"""

import datetime
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from failures import free_port  # noqa: E402

WORK = Path(os.environ.get("BENCH_WORK", "/tmp/full"))
FOLDERS = {"safetensors": WORK / "gptj-6b-safetensors", "pickle": WORK / "gptj-6b-pickle"}
OUTSIDE_ALLOCATOR_GIB = 2.2  # as bench/gpu_bench.py: the CUDA context and NCCL, outside PyTorch's allocator
CAP = """import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("BENCH_GPU_GIB"):
    import torch
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((float(os.environ["BENCH_GPU_GIB"]) - {outside}) * 2**30 / total)
""".format(outside=OUTSIDE_ALLOCATOR_GIB)


def make(megabytes=5.0, pickle=1, layers=28):
    """The corpus, the tokenizer, GPT-J-6B with random FP16 weights in both formats (pickle=0: safetensors
    only, 12 GB less disk and a minute less), and the dataset. layers < 28: GPT-J-6B's blocks, fewer of them
    (a model whose exact Adam fits an 80 GB card whole, for comparisons of numerics)."""
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    import token_split

    text = WORK / "text"
    tokenizer = local_bpe(python_sources(text, megabytes), vocab_size=8192)
    started = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):  # 6 billion random weights: seconds on the GPU, minutes on the CPU
        model = GPTJForCausalLM(GPTJConfig(n_layer=int(layers), bos_token_id=tokenizer.eos_token_id,
                                           eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(FOLDERS["safetensors"])
    # transformers 5 writes safetensors whatever save_pretrained is told; the pickle older hub folders hold
    # (pytorch_model.bin) is written as torch.save writes it, with the same config beside it
    formats = dict(FOLDERS) if pickle else {"safetensors": FOLDERS["safetensors"]}
    if pickle:
        model.config.save_pretrained(FOLDERS["pickle"])
        torch.save({name: tensor.cpu() for name, tensor in model.state_dict().items()},
                   FOLDERS["pickle"] / "pytorch_model.bin")
    for name, folder in formats.items():
        tokenizer.save_pretrained(folder)
        print(f"{name}: {sorted(p.name for p in folder.iterdir())} in {time.time() - started:.0f} s", flush=True)
    del model
    token_split.SETTINGS.update(text_dir=str(text), dataset_dir=str(WORK / "dataset"),
                                tokenizer=str(FOLDERS["safetensors"]), block_size=2048)
    token_split.main()


def python_sources(text, megabytes):
    """About `megabytes` of this machine's Python sources copied into `text` as .txt files (once): real text
    that the hub's absence leaves us. Returns the files."""
    if not text.exists():
        size = 0
        for path in sorted(Path(sys.base_prefix, "lib").rglob("*.py")):
            try:
                content = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if content.strip() and size < megabytes * 1e6:
                target = text / path.relative_to(sys.base_prefix).with_suffix(".txt")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content, encoding="utf-8")
                size += len(content.encode())
    files = sorted(str(path) for path in text.rglob("*.txt"))
    print(f"corpus: {len(files)} files, {corpus_mb():.1f} MB of Python sources", flush=True)
    return files


def local_bpe(files, vocab_size):
    """A byte-level BPE trained on `files`, as a Transformers tokenizer with GPT-J's end-of-text token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=2048)


def load(weights_format, setup_name):
    """finetune.load_model() on one folder, in a process started as the launcher would, until the weights are
    on the GPU: its peak host memory (anonymous and file-backed pages apart), the machine's, and the time."""
    if os.environ.get("LOCAL_RANK") is None:  # start the measured process, alone
        environment = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()))
        subprocess.run([sys.executable, __file__, "load", weights_format, setup_name], env=environment, check=True)
        return
    from transformers import AutoConfig

    import ds_config
    import finetune
    import plan

    folder = FOLDERS[weights_format]
    finetune.MODEL.update(name=str(folder), revision=None)
    setup = {"name": setup_name, **plan.SETUPS[setup_name]}
    training = {**finetune.TRAINING, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                "per_device_eval_batch_size": 1}
    arguments = finetune.training_arguments(ds_config.deepspeed_config(setup, "/tmp/nvme"), training)
    watcher = HostWatcher(os.getpid())
    started = time.time()
    model = finetune.load_model(AutoConfig.from_pretrained(folder), setup, arguments)
    seconds = time.time() - started
    if not next(model.parameters()).is_cuda:  # ZeRO-2 (LoRA): the Trainer moves the weights read to the GPU
        model.to("cuda")
    moved = time.time() - started
    watcher.stop()
    record = {**describe(f"load-{weights_format}-{setup_name}", setup_name), "ok": True,
              "weights_format": weights_format, "files": sorted(p.name for p in folder.iterdir()),
              "files_gb": round(sum(p.stat().st_size for p in folder.iterdir()) / 1e9, 2),
              "load_s": round(seconds, 1), "on_gpu_s": round(moved, 1), "host_rss_peak_gib": round(resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss / 2**20, 1), **watcher.peaks(),
              "model_on": str(next(model.parameters()).device),
              "command": f"python3 bench/product_run.py load {weights_format} {setup_name}"}
    save_record(record)


# DeepSpeed 0.19.8's smaller optimizer states (issue #28): bytes a parameter in host RAM, with the bf16 weights
# and gradients: exact Adam 16 (fp32 master weights, fp32 m and v), bf16 master weights 12, and bf16 moments 8;
# and exact Adam with the blocks' Linear layers in FP8, compiled (finetune.py's FP8).
STATES = {
    "exact": {"DS_CONFIG": {}},
    "bf16-master": {"DS_CONFIG": {"bf16": {"bf16_master_weights_and_grads": True}}},
    "bf16-master-states": {"DS_CONFIG": {"bf16": {"bf16_master_weights_and_grads": True,
                                                  "bf16_optimizer_states": True}}},
    "fp8-compile": {"FP8": True},
}


def state(variant, gpu_gib=24.0, epochs=3, setup_name="ram-optimizer", batch=None):
    """One optimizer state of STATES through `ram-optimizer` (or another set-up) in bf16, at the product's LR and cosine
    schedule with 5 warm-up steps (a random model's first full-LR Adam step throws its loss from 11 to 21):
    the same seed and data for each, a validation loss after every epoch (`make 2.2`: ~16 optimizer steps an
    epoch at FULL_BATCH 16). No checkpoints: one of exact Adam's is ~97 GB, more than the GPU machine's disk.
    `gpu` on a 139 GiB card (GIB 0) runs the same comparison in a third of ram-optimizer's time. `batch`: the
    per-device batch where the plan has no measured one to pick (a model of fewer blocks: it picks 1)."""
    batches = {"per_device_train_batch_size": int(batch), "gradient_accumulation_steps": 16 // int(batch)} \
        if batch else {}
    run(setup_name, gpu_gib or None, changes={
        "TRAINING": {"bf16": True, "num_train_epochs": int(epochs), "warmup_steps": 5, **batches},
        "FULL_BATCH": 16, "CHECKPOINTS": {"every_steps": None}, **STATES[variant]}, variant=variant)


def run(setup_name, gpu_gib=None, weights_format="safetensors", changes=None, variant=None):
    """`deepspeed --num_gpus 1 finetune.py` (through tests/run_finetune.py, which sets finetune.py's dicts from
    a JSON file): its plan's printed estimate against the Trainer's measured train_runtime."""
    out = WORK / "out"
    settings = {"MODEL": {"name": str(FOLDERS[weights_format]), "revision": None},
                "FILES": {"dataset_dir": str(WORK / "dataset"), "out_dir": str(out),
                          "checkpoint_dir": str(WORK / "checkpoints"), "offload_dir": str(WORK / "nvme")},
                "SETUP": setup_name, "MACHINE": {"gpu_memory_gib": gpu_gib}, **(changes or {})}
    settings_file = WORK / f"{setup_name}.settings.json"
    settings_file.write_text(json.dumps(settings))
    (WORK / "site").mkdir(exist_ok=True)
    (WORK / "site" / "sitecustomize.py").write_text(CAP)
    environment = dict(os.environ, PYTHONPATH=f"{WORK / 'site'}:{os.environ.get('PYTHONPATH', '')}",
                       BENCH_GPU_GIB=str(gpu_gib or ""))
    command = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()),
               str(REPO / "tests" / "run_finetune.py"), str(settings_file)]
    started = time.time()
    process = subprocess.Popen(command, env=environment, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    watcher, gpu = HostWatcher(process.pid), GpuWatcher()
    lines = []
    for line in process.stdout:
        print(line, end="", file=sys.stderr, flush=True)
        lines.append(line)
    process.wait()
    watcher.stop(), gpu.stop()
    output = "".join(lines)
    point = f"run-{setup_name}-{gpu_gib or 'full'}" + (f"-{variant}" if variant else "") + layers_suffix()
    record = {**describe(point, setup_name), "ok": process.returncode == 0, "changes": changes,
              "vram_budget_gib": gpu_gib, "weights_format": weights_format, "wall_s": round(time.time() - started, 1),
              **watcher.peaks(), "gpu_used_peak_mib": gpu.peak_mib,
              "command": f"python3 bench/product_run.py run {setup_name} {gpu_gib or ''}".strip() if not variant
              else f"python3 bench/product_run.py state {variant} {gpu_gib or 0:g} "
                   f"{changes['TRAINING']['num_train_epochs']} {setup_name} "
                   f"{changes['TRAINING'].get('per_device_train_batch_size', '')}".strip()}
    plan_lines = [line for line in lines if line.startswith(("Batch", "Speed on this card", "Estimated time",
                                                               "Set-up:", "Disk:"))]
    record["plan"] = [line.rstrip() for line in plan_lines]
    estimate = re.search(r"-> ~([\d.]+) (s|min|h) of training", output)
    if estimate:
        record["estimated_s"] = float(estimate.group(1)) * {"s": 1, "min": 60, "h": 3600}[estimate.group(2)]
    tokens_per_s = re.search(r"~([\d,]+) tokens/s estimated", output)
    if tokens_per_s:
        record["estimated_tokens_per_s"] = int(tokens_per_s.group(1).replace(",", ""))
    if process.returncode == 0:
        log = json.loads((out / "finetune_log.json").read_text())
        final = log["log_history"][-1]
        record.update(measured_train_s=round(final["train_runtime"], 1), losses=[
            entry["loss"] for entry in log["log_history"] if "loss" in entry],
            validation_loss_before=log.get("validation_loss_before"),
            validation_loss_after=log.get("validation_loss_after"), validation_losses=[
                [entry["step"], entry["eval_loss"]] for entry in log["log_history"] if "eval_loss" in entry],
            train_tokens=round(log["dataset"]["counts"]["train"]["samples"] * log["dataset"]["block_size"]
                               * final.get("epoch", 1)))
        record["measured_tokens_per_s"] = round(record["train_tokens"] / final["train_runtime"], 1)
        if "estimated_s" in record:
            record["estimate_error"] = round(record["estimated_s"] / record["measured_train_s"] - 1, 3)
        record["checkpoints_left"] = sorted(p.name for p in (WORK / "checkpoints").glob("checkpoint-*")) \
            if (WORK / "checkpoints").exists() else []
    else:
        record["failure"] = output.strip().splitlines()[-1][:300] if output.strip() else "no output"
    save_record(record)


class HostWatcher:
    """Peak host memory of a process and its children (anonymous and file-backed pages), and of the machine."""

    def __init__(self, pid):
        import psutil

        self.root, self.running = psutil.Process(pid), True
        self.anon = self.file = self.machine = 0
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        import psutil

        total = psutil.virtual_memory().total
        while self.running:
            anon = file = 0
            try:
                for process in [self.root, *self.root.children(recursive=True)]:
                    fields = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text()
                                  .splitlines() if line.startswith(("RssAnon", "RssFile", "RssShmem")))
                    anon += int(fields.get("RssAnon", "0 kB").split()[0]) * 1024
                    file += int(fields.get("RssFile", "0 kB").split()[0]) * 1024
            except (psutil.Error, OSError, ValueError):
                pass
            self.anon, self.file = max(self.anon, anon), max(self.file, file)
            self.machine = max(self.machine, total - psutil.virtual_memory().available)
            time.sleep(0.2)

    def stop(self):
        self.running = False
        self.thread.join()

    def peaks(self):
        return {"host_anon_peak_gib": round(self.anon / 2**30, 1), "host_file_peak_gib": round(self.file / 2**30, 1),
                "host_used_peak_gib": round(self.machine / 2**30, 1)}


class GpuWatcher:
    """The GPU's used memory as the driver reports it (nvidia-smi), polled once a second."""

    def __init__(self):
        self.peak_mib, self.running = 0, True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while self.running:
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=10).stdout.split()
                self.peak_mib = max(self.peak_mib, int(used[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            time.sleep(1)

    def stop(self):
        self.running = False


def describe(point, setup_name):
    import deepspeed
    import torch
    import transformers

    return {"point": point, "setup": setup_name, "date": datetime.date.today().isoformat(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "gpus": 1,
            "cpu_threads": torch.get_num_threads(), "host_ram_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                          * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "deepspeed": deepspeed.__version__, "python": sys.version.split()[0]},
            "model": model_description(),
            "data": f"the machine's Python sources ({corpus_mb():.1f} MB), BPE 8,192"}


def model_shape():
    config = json.loads((FOLDERS["safetensors"] / "config.json").read_text())
    return config["n_layer"], config["n_embd"]


def layers_suffix():
    """'' for GPT-J-6B's shape in the safetensors folder, else '-14layers' (its blocks, fewer) or
    '-4layersx256' (narrower too: bench/state_proxy.py's)."""
    layers, width = model_shape()
    return "" if (layers, width) == (28, 4096) else f"-{layers}layers" + ("" if width == 4096 else f"x{width}")


def model_description():
    layers, width = model_shape()
    if (layers, width) == (28, 4096):
        return "GPTJConfig() (GPT-J-6B), random FP16 weights"
    return f"GPT-J of {layers} layers x {width}" + (" (GPT-J-6B's blocks, fewer)" if width == 4096 else "") \
        + ", random weights"


def corpus_mb():
    return sum(path.stat().st_size for path in (WORK / "text").rglob("*.txt")) / 1e6


def save_record(record):
    results = Path(os.environ.get("BENCH_RESULTS", REPO / "bench" / "results.json"))
    records = json.loads(results.read_text()) if results.exists() else []
    results.write_text(json.dumps(records + [record], indent=1) + "\n")
    print("BENCH_RECORD " + json.dumps(record), flush=True)


if __name__ == "__main__":
    verb, arguments = sys.argv[1], sys.argv[2:]
    if verb == "make":
        make(*map(float, arguments))
    elif verb == "load":
        load(*arguments)
    elif verb == "state":
        state(arguments[0], *map(float, arguments[1:3]), *arguments[3:])
    elif verb == "run":
        run(arguments[0], float(arguments[1]) if len(arguments) > 1 else None, *arguments[2:])
