"""Host RAM of LoRA's last stage: finetune.merge_adapters() on a full-size GPT-J-6B, on the CPU.

    python bench/merge_bench.py        # ~10 minutes on 2 cores; ~25 GB of disk in BENCH["work_dir"]

The merge runs on the CPU whatever the card (the base model is read again into RAM, the adapters added,
the plain model written), so any machine measures it. A child process builds GPT-J-6B from GPTJConfig()
with random FP16 weights and saves it as the base model, with random LoRA adapters (finetune.py's LORA,
B not zero, so that merging changes the weights); a fresh child then imports finetune.py, as a run
would, and calls its merge_adapters(), while a thread polls its resident memory. The record (peak RSS,
and its anonymous part: file pages that safetensors maps can be dropped by the kernel, the rest cannot)
is appended to bench/results.json (or $BENCH_RESULTS).
"""

import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BENCH = {
    "work_dir": "/tmp/merge_bench",  # the base model (12 GB) and out.partial/ (12 GB more); removed after
    "poll_s": 0.05,  # how often the child's memory is read
}


def main():
    work = Path(BENCH["work_dir"])
    shutil.rmtree(work, ignore_errors=True)
    print("Building GPT-J-6B with random FP16 weights and random adapters ...", flush=True)
    subprocess.run([sys.executable, __file__, "--make", str(work)], check=True)
    print("Merging as finetune.merge_adapters() does ...", flush=True)
    output = subprocess.run([sys.executable, __file__, "--merge", str(work)], check=True,
                            capture_output=True, text=True).stdout
    record = json.loads(output.partition("MERGE_RECORD ")[2])
    shutil.rmtree(work, ignore_errors=True)
    results_file = Path(os.environ.get("BENCH_RESULTS", REPO / "bench" / "results.json"))
    records = json.loads(results_file.read_text()) if results_file.exists() else []
    results_file.write_text(json.dumps(records + [record], indent=1) + "\n")
    print(json.dumps(record, indent=1))


def make_base_and_adapters(work):
    """GPT-J-6B, random FP16, saved as the base model; adapters on it saved where finetune.save() puts them."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPTJConfig

    import finetune

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPTJConfig(use_cache=False), dtype=torch.float16)
    model.save_pretrained(work / "base")
    adapters = get_peft_model(model, LoraConfig(**finetune.LORA, init_lora_weights=False),
                              autocast_adapter_dtype=False)  # FP16 adapters, as finetune.load_model
    adapters.save_pretrained(work / "out.partial" / "lora_adapter")


def merge(work):
    """finetune.merge_adapters() in a process that has imported what finetune.py imports; its memory."""
    import finetune

    finetune.MODEL.update(name=str(work / "base"), revision=None)
    before = memory()
    peaks, running = dict(before), True

    def poll():
        while running:
            for key, value in memory().items():
                peaks[key] = max(peaks[key], value)
            time.sleep(BENCH["poll_s"])

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    started = time.time()
    finetune.merge_adapters(work / "out.partial")
    seconds = time.time() - started
    running = False
    watcher.join()
    print("MERGE_RECORD " + json.dumps(describe(before, peaks, seconds, check_merged(work))))


def memory():
    """This process's resident memory in GiB: all of it, its anonymous part, its file-backed part."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kib = lambda key: int(status[key].split()[0])
    return {"rss": kib("VmRSS") / 2**20, "anonymous": kib("RssAnon") / 2**20, "file": kib("RssFile") / 2**20}


def check_merged(work):
    """The merged model's q_proj differs from the base model's (adapters added), its MLP does not."""
    from safetensors import safe_open

    def tensor(folder, name):
        index = folder / "model.safetensors.index.json"
        file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
        with safe_open(folder / file, "pt") as weights:
            return weights.get_tensor(name)

    changed, unchanged = "transformer.h.0.attn.q_proj.weight", "transformer.h.0.mlp.fc_in.weight"
    merged, base = work / "out.partial", work / "base"
    assert not tensor(merged, changed).equal(tensor(base, changed)), "the adapters were not merged"
    assert tensor(merged, unchanged).equal(tensor(base, unchanged)), "a weight without adapters changed"
    return f"{changed} changed, {unchanged} unchanged"


def describe(before, peaks, seconds, check):
    import peft
    import torch
    import transformers

    return {
        "point": "lora-merge-6b", "setup": "lora, lora-ram (their last stage)", "gpu": "none (the merge runs on the CPU)",
        "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": sys.version.split()[0]},
        "command": "python bench/merge_bench.py", "parameters": 6.05e9, "dtype": "float16",
        "host_rss_before_gib": round(before["rss"], 2),
        "host_rss_peak_gib": round(peaks["rss"], 2),
        "host_anonymous_peak_gib": round(peaks["anonymous"], 2),
        "host_file_backed_peak_gib": round(peaks["file"], 2),
        "host_ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "merge_s": round(seconds, 1), "check": check,
    }


if __name__ == "__main__":
    if "--make" in sys.argv:
        make_base_and_adapters(Path(sys.argv[-1]))
    elif "--merge" in sys.argv:
        merge(Path(sys.argv[-1]))
    else:
        main()
