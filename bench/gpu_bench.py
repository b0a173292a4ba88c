"""GPU benchmark of finetune.py's own code path: full-size GPT-J-6B, seq 2048, emulated VRAM budgets.

    python bench/gpu_bench.py                 # every point in POINTS, one process each, on one GPU
    python bench/gpu_bench.py ram-24 orig-24  # only these points

Each point runs in its own process (fresh GPU and host memory counters) through the same functions
finetune.py uses (its set-up's ds_config.deepspeed_config, training_arguments, train() with the HF
Trainer, the memory savers), with two differences a benchmark needs: the model is GPT-J-6B built from
GPTJConfig() with random weights (the hub is out of reach; memory and speed are the same), and the
samples are random tokens.

A VRAM budget is emulated by capping PyTorch's allocator at budget - OUTSIDE_ALLOCATOR_GIB, the CUDA
context, NCCL and cuBLAS workspaces that live outside it; a point counts as fitting ("ok") only if it
finished and the whole process's GPU memory (polled from the driver) stayed within the budget.
Records are appended to bench/results.json (or $BENCH_RESULTS).
"""

import datetime
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import failures  # noqa: E402  (the product's own helpers)
import plan  # noqa: E402
from failures import free_port  # noqa: E402

OUTSIDE_ALLOCATOR_GIB = 2.2  # measured: the DeepSpeed process holds 1.65-2.2 GiB outside PyTorch's allocator
PEAK_FLOPS = 790e12  # measured dense bf16/fp16 matmul rate of the H200 (8192^3 products)
SEQ_LEN = 2048
ZIPF_EXPONENT = 1.1  # English words' is about 1
ZIPF_SAMPLES = f"tokens drawn independently with P(k-th commonest) ~ 1/k^{ZIPF_EXPONENT}"

# The original project's settings, from its README and ds_config: ZeRO-3, params and optimizer offloaded,
# no pinned memory, FP16 starting at loss scale 2^12, DeepSpeed's WarmupLR, B=7 in 24 GiB with
# per_device * accumulation ~ 128 (its README's advice: 7 x 18 = 126).
ORIGINAL_DS = {
    "zero_optimization": {"offload_param": {"device": "cpu", "pin_memory": False},
                          "offload_optimizer": {"device": "cpu", "pin_memory": False}},
    "fp16": {"initial_scale_power": 12},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
}

# ZeRO-3 fetches a whole GPT-J block's weights in one hook instead of one per Linear: no hooks inside a
# block, so torch.compile's graphs of its attention and MLP run without a break.
BLOCKS_AS_LEAVES = {"zero_optimization": {
    "leaf_module": {"classes": ["transformers.models.gptj.modeling_gptj.GPTJBlock"]}}}
NVME_PATH = os.environ.get("BENCH_NVME_PATH", "/tmp/nvme_offload")  # the "disk" points' FILES["offload_dir"]
TINY = dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=2048, vocab_size=512)  # for smoke-cpu points

# name: the set-up (plan.SETUPS, as finetune.py runs it; "original" = the original project's settings),
# VRAM budget in GiB (None: the whole card), batch, accumulation, optimizer steps (the first carries CPU
# Adam's state allocation; the last is reported), host RAM limit (a memory cgroup), DeepSpeed overrides,
# GPT-J overrides (e.g. fewer layers), save (the final save of finetune.py, timed, its RAM measured).
# Any point runs at another batch as "<point>-b<N>" (e.g. ram-24-b27).
POINTS = {
    "ram-24": dict(setup="ram", budget=24, batch=26, accumulation=8, steps=2),
    "ram-24-save": dict(setup="ram", budget=24, batch=26, accumulation=8, steps=2, host_limit_gib=120, save=True),
    "ram-pinned-24": dict(setup="ram-pinned", budget=24, batch=26, accumulation=8, steps=2, host_limit_gib=124),
    # Two ways under 112 GiB of host RAM (#12), both with the optimizer state in RAM: the FP16 weights
    # kept on the GPU (11.3 GiB), or Twin-Flow's `ratio` (the first 10% of the optimizer sub-groups on
    # the GPU, 16 bytes a parameter there; sub-groups of 1e8 parameters so that 10% is 6 of 61).
    "ram-weights-gpu-24": dict(setup="ram", budget=24, batch=11, accumulation=8, steps=2, host_limit_gib=120,
                               ds={"zero_optimization": {"offload_param": {"device": "none"}}}),
    "ram-weights-gpu-pinned-24": dict(setup="ram-pinned", budget=24, batch=11, accumulation=8, steps=2,
                                      host_limit_gib=120,
                                      ds={"zero_optimization": {"offload_param": {"device": "none"}}}),
    "ram-optimizer-24": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                             host_limit_gib=120),
    # Accumulation (#13): CPU Adam's 5-6 s step over 16 micro-steps instead of 8 (a small corpus gets half the steps).
    "ram-optimizer-24-ga16": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=16, steps=2,
                                  host_limit_gib=120),
    # SuperOffload (#13): CPU Adam steps each sub-group as soon as its gradients are complete in the last
    # backward; DeepSpeed 0.19.8 does that only without gradient clipping. Its reference, for speed and for
    # the losses step by step: the same settings without it (ram-optimizer-24-noclip). Both at FP16's
    # default loss scale, 2^16, where no step of this model overflowed. Not offered by finetune.py: it did
    # not fit 120 GiB, and an FP16 overflow's roll-back zeroes weights (bench/RESULTS.md, ninth session).
    "ram-optimizer-24-noclip": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=5,
                                    host_limit_gib=120, training={"max_grad_norm": 0.0},
                                    ds={"zero_optimization": {"sub_group_size": 1e8}}),
    "ram-optimizer-24-superoffload": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=5,
                                          host_limit_gib=120, training={"max_grad_norm": 0.0},
                                          ds={"zero_optimization": {"offload_optimizer": {"super_offload": True},
                                                                    "sub_group_size": 1e8}}),
    # Kernel fusion (#13): each block's attention and MLP compiled by torch.compile (Inductor); gradient
    # checkpointing and ZeRO-3's hooks stay eager around them (compiling the whole checkpointed block ran
    # out of memory at B=11, and so did "-hooked", ZeRO-3's hooks inside the graphs). Step 1 carries the
    # compilation; step 2 is reported. Not kept: +0.7% tokens/s, and its loss drifts (bench/RESULTS.md).
    "ram-optimizer-24-leaf": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                  host_limit_gib=120, ds=BLOCKS_AS_LEAVES),
    "ram-optimizer-24-compile": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                     host_limit_gib=120, ds=BLOCKS_AS_LEAVES, compile_blocks=True),
    "ram-optimizer-24-compile-hooked": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                            host_limit_gib=120, compile_blocks=True),  # ZeRO-3 hooks in the graphs
    # Faster micro-steps (#28), in bf16 like FP8's reference below. host_activations: the last N GPT-J blocks
    # are not recomputed in backward; what they save for it waits in pinned host RAM (bench/activation_bytes.py:
    # its bytes a token). bind_cores: the process on the physical cores with as many OpenMP threads, as
    # `deepspeed --bind_cores_to_rank` does.
    "ram-optimizer-24-host2": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                   training={"bf16": True}, host_activations=2),
    "ram-optimizer-24-host4": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                   training={"bf16": True}, host_activations=4),
    "ram-optimizer-24-bind": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                  host_limit_gib=120, training={"bf16": True}, bind_cores=True),
    # fp8: each block's attention and MLP Linear layers in FP8 through torchao (its wheel in .whl/; cards with
    # FP8: Ada, Hopper, Blackwell), the embeddings and lm_head as they were; in bf16, against its bf16 reference.
    "ram-optimizer-24-bf16": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                  host_limit_gib=120, training={"bf16": True}),
    "ram-optimizer-24-fp8": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                 host_limit_gib=120, training={"bf16": True}, fp8=True),
    # torchao's FP8 casts fused into the blocks' compiled graphs (each block one ZeRO-3 leaf, as -compile)
    "ram-optimizer-24-fp8-compile": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=8, steps=2,
                                         host_limit_gib=120, training={"bf16": True}, fp8=True,
                                         ds=BLOCKS_AS_LEAVES, compile_blocks=True),
    # The same two at GA 16, as ram-optimizer's best offered point (9,141 tokens/s on an H200)
    "ram-optimizer-24-bf16-ga16": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=16, steps=2,
                                       host_limit_gib=120, training={"bf16": True}),
    "ram-optimizer-24-fp8-compile-ga16": dict(setup="ram-optimizer", budget=24, batch=11, accumulation=16, steps=2,
                                              host_limit_gib=120, training={"bf16": True}, fp8=True,
                                              ds=BLOCKS_AS_LEAVES, compile_blocks=True),
    "ram-twinflow-24": dict(setup="ram", budget=24, batch=14, accumulation=8, steps=2, host_limit_gib=120,
                            ds={"zero_optimization": {"offload_optimizer": {"ratio": 0.9},
                                                      "sub_group_size": 1e8}}),
    "orig-24": dict(setup="original", budget=24, batch=7, accumulation=18, steps=2, ds=ORIGINAL_DS),
    "ram-16": dict(setup="ram", budget=16, batch=14, accumulation=2, steps=1),
    "ram-12": dict(setup="ram", budget=12, batch=10, accumulation=2, steps=1),
    "ram-8": dict(setup="ram", budget=8, batch=2, accumulation=2, steps=1),
    "ram-24x2": dict(setup="ram", budget=24, batch=26, accumulation=8, steps=2, gpus=2),
    # Nothing offloaded: the whole card (139 GiB on an H200); PyTorch's AdamW on the GPU.
    "gpu": dict(setup="gpu", budget=None, batch=22, accumulation=4, steps=2),
    # LoRA r=16 on q, v (finetune.py's LORA): the model on the GPU (ZeRO-2), or streamed from RAM (ZeRO-3).
    "lora-24": dict(setup="lora", budget=24, batch=12, accumulation=2, steps=2),
    # Two levers for LoRA's speed at 24 GiB: ZeRO-2 (no ZeRO-3 hooks around every layer; the model fits
    # the card whole) and no dropout on the adapters' input (torchtune's LoRA default).
    "lora-24-zero2": dict(setup="lora", budget=24, batch=12, accumulation=2, steps=2,
                          ds={"zero_optimization": {"stage": 2}}),
    "lora-24-nodropout": dict(setup="lora", budget=24, batch=12, accumulation=2, steps=2,
                              lora={"lora_dropout": 0.0}),
    "lora-16": dict(setup="lora", budget=16, batch=2, accumulation=2, steps=2),
    "lora-ram-16": dict(setup="lora-ram", budget=16, batch=15, accumulation=2, steps=2, host_limit_gib=32),
    "lora-ram-8": dict(setup="lora-ram", budget=8, batch=4, accumulation=2, steps=2, host_limit_gib=32),
    "lora-ram-12": dict(setup="lora-ram", budget=12, batch=10, accumulation=2, steps=2, host_limit_gib=32),
    # Does the small-card set-up learn? Random tokens cannot be learnt; Zipf-distributed ones (a few tokens
    # common, most rare, as in text) can, so the loss of fresh samples falls where training works. At
    # LoRA's learning rate, finetune.py's LORA_TRAINING (TRAINING's 1e-5 suits full fine-tuning: on the
    # CPU's tiny GPT-J, 12 steps at 1e-5 moved the loss by 0.003, at 2e-4 by 0.014).
    "lora-ram-8-learn": dict(setup="lora-ram", budget=8, batch=4, accumulation=2, steps=24, host_limit_gib=32,
                             data="zipf", training={"learning_rate": 2e-4}),
    # B=4 in 8 GiB ran out of GPU memory at step 12 of this point (at the cap from the first step); the
    # 12 GiB batch, measured over 2 steps like 8 GiB's, is held over 24 here.
    "lora-ram-12-learn": dict(setup="lora-ram", budget=12, batch=10, accumulation=2, steps=24, host_limit_gib=32,
                              data="zipf", training={"learning_rate": 2e-4}),
    "lora-ram-16-learn": dict(setup="lora-ram", budget=16, batch=15, accumulation=2, steps=24, host_limit_gib=32,
                              data="zipf", training={"learning_rate": 2e-4}),
    # The optimizer state on disk, in a 64 GiB memory limit. The 64 GiB disk of the one-GPU machine cannot
    # hold GPT-J's 97 GB of files: "disk-24-14l" is GPT-J with 14 of its 28 layers (51.7 GB of files).
    "disk-24": dict(setup="disk", budget=24, batch=26, accumulation=8, steps=2, host_limit_gib=64),
    # GA 4 to fit the device call's 10 minutes; other GAs follow from its micro-step and optimizer step.
    "disk-24-14l": dict(setup="disk", budget=24, batch=26, accumulation=4, steps=2, host_limit_gib=64,
                        config=dict(n_layer=14)),
    "disk-24-14l-ga12": dict(setup="disk", budget=24, batch=26, accumulation=12, steps=2, host_limit_gib=64,
                             config=dict(n_layer=14)),
    # The code paths on a CPU, with a 2-layer GPT-J: `DS_ACCELERATOR=cpu python bench/gpu_bench.py smoke-cpu`.
    "smoke-cpu": dict(setup="ram", budget=24, batch=2, accumulation=3, steps=2, config=TINY, save=True),
    "smoke-cpu-gpu": dict(setup="gpu", budget=None, batch=2, accumulation=3, steps=2, config=TINY),
    "smoke-cpu-disk": dict(setup="disk", budget=24, batch=2, accumulation=3, steps=2, config=TINY, host_limit_gib=8),
    "smoke-cpu-ram-optimizer": dict(setup="ram-optimizer", budget=24, batch=2, accumulation=3, steps=2,
                                    config=TINY),
    "smoke-cpu-ram-optimizer-leaf": dict(setup="ram-optimizer", budget=24, batch=2, accumulation=3, steps=2,
                                         config=dict(TINY, n_layer=10), ds=BLOCKS_AS_LEAVES),
    "smoke-cpu-ram-optimizer-compile": dict(setup="ram-optimizer", budget=24, batch=2, accumulation=3, steps=2,
                                            config=dict(TINY, n_layer=10), ds=BLOCKS_AS_LEAVES, compile_blocks=True),
    "smoke-cpu-ram-optimizer-compile-hooked": dict(setup="ram-optimizer", budget=24, batch=2, accumulation=3,
                                                   steps=2, config=dict(TINY, n_layer=10), compile_blocks=True),
    "smoke-cpu-ram-optimizer-host": dict(setup="ram-optimizer", budget=24, batch=2, accumulation=3, steps=2,
                                         config=TINY, host_activations=1, bind_cores=True),
    "smoke-cpu-ram-optimizer-fp8": dict(setup="ram-optimizer", budget=24, batch=2, accumulation=3, steps=2,
                                        config=TINY, fp8=True),
    "smoke-cpu-ram-optimizer-fp8-compile": dict(setup="ram-optimizer", budget=24, batch=2, accumulation=3, steps=2,
                                                config=TINY, fp8=True, ds=BLOCKS_AS_LEAVES, compile_blocks=True),
    "smoke-cpu-lora": dict(setup="lora", budget=24, batch=2, accumulation=3, steps=2, config=TINY),
    "smoke-cpu-lora-ram": dict(setup="lora-ram", budget=24, batch=2, accumulation=3, steps=2, config=TINY),
    "smoke-cpu-lora-ram-learn": dict(setup="lora-ram", budget=24, batch=2, accumulation=2, steps=12, config=TINY,
                                     data="zipf", training={"learning_rate": 2e-4}),
    "smoke-cpu-orig": dict(setup="original", budget=24, batch=2, accumulation=3, steps=2, config=TINY, ds=ORIGINAL_DS),
}


def point_settings(name):
    """A point of POINTS by name; "<point>-b<N>" is that point at per-device batch N (e.g. ours-24-b20)."""
    if name in POINTS:
        return POINTS[name]
    base, _, batch = name.rpartition("-b")
    if base not in POINTS or not batch.isdigit():
        raise SystemExit(f"gpu_bench.py: no point {name!r}; the points are {', '.join(POINTS)} (or <point>-b<N>)")
    return dict(POINTS[base], batch=int(batch))


def main(names):
    results_file = Path(os.environ.get("BENCH_RESULTS", REPO / "bench" / "results.json"))
    names = names or list(POINTS)
    [point_settings(name) for name in names]  # a misspelt point stops here, before hours of others
    for name in names:
        for record in run_in_own_process(name):
            records = json.loads(results_file.read_text()) if results_file.exists() else []
            results_file.write_text(json.dumps(records + [record], indent=1) + "\n")
            print(json.dumps(record), flush=True)


def run_in_own_process(name):
    """One point = one process started like `deepspeed --num_gpus 1` would (RANK, WORLD_SIZE, ...)."""
    environment = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))
    point = point_settings(name)
    if point["setup"] != "original":  # what finetune.main() sets; the original project did not
        environment["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    command = [sys.executable, __file__, "--point", name]
    if point.get("gpus", 1) > 1:  # through DeepSpeed's launcher, one process per GPU
        command = ["deepspeed", "--num_gpus", str(point["gpus"]), "--master_port",
                   environment["MASTER_PORT"], __file__, "--point", name]
    if point.get("bind_cores"):
        import psutil

        cores = psutil.cpu_count(logical=False)
        command = ["taskset", "-c", f"0-{cores - 1}", *command]
        environment["OMP_NUM_THREADS"] = str(cores)
    limit = host_limit(point.get("host_limit_gib"), environment)
    started = time.time()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=limit["enter"] if limit else None, start_new_session=True)
    lines = []
    reader = threading.Thread(target=echo_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    returncode = process.wait()
    # A child the point started (SuperOffload's CPU Adam worker) outlives a killed point and holds its log
    # open: end the point's whole process group, so that its log ends too.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    reader.join()
    records = [json.loads(line.partition("BENCH_RECORD ")[2]) for line in lines if "BENCH_RECORD " in line]
    tail = "".join(lines)[-3000:]
    if not records or records[-1]["ok"] and returncode != 0:  # died before or after its last record
        records.append({**describe(name, point), "ok": False, "exit_code": returncode,
                        "failure": failure_reason(tail, returncode), "wall_s": round(time.time() - started, 1)})
    for record in records:
        if limit:
            record["host_limit"] = limit["describe"]()
    return records


def echo_lines(stream, lines):
    """The point's own log as it runs (a device call cut short keeps it), and kept for its records."""
    for line in stream:
        print(line, end="", file=sys.stderr, flush=True)
        lines.append(line)


def host_limit(limit_gib, environment):
    """A host-RAM limit for a point's process: a cgroup memory limit where the machine lets us make one
    (the kernel kills the process at the limit, like a desktop's OOM killer), else a watchdog in the
    process that kills it when its RSS passes the limit."""
    if not limit_gib:
        return None
    try:
        group = memory_cgroup(int(limit_gib * 2**30))
    except OSError as error:
        print(f"No cgroup memory limit here ({error}); a watchdog kills the point at {limit_gib} GiB RSS instead.")
        environment["BENCH_HOST_LIMIT_GIB"] = str(limit_gib)
        return {"enter": None, "describe": lambda: {"gib": limit_gib, "how": "watchdog on the process's RSS"}}

    def describe_cgroup():
        peak_file = group / ("memory.peak" if (group / "memory.peak").exists() else "memory.max_usage_in_bytes")
        events_file = group / ("memory.events" if (group / "memory.events").exists() else "memory.oom_control")
        events = dict(line.split() for line in events_file.read_text().splitlines())
        return {"gib": limit_gib, "how": f"cgroup {group}", "oom_kills": int(events.get("oom_kill", 0)),
                "cgroup_peak_gib": round(int(peak_file.read_text()) / 2**30, 1) if peak_file.exists() else None}

    return {"enter": lambda: (group / "cgroup.procs").write_text(str(os.getpid())), "describe": describe_cgroup}


def memory_cgroup(limit_bytes):
    """A fresh memory cgroup limited to limit_bytes (RAM and swap together); OSError where none can be made."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():  # cgroup v2: limits only on leaves, so move everyone else to one
        (root / "bench-rest").mkdir(exist_ok=True)
        for pid in (root / "cgroup.procs").read_text().split():
            try:
                (root / "bench-rest" / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        (root / "cgroup.subtree_control").write_text("+memory")
        group = root / "bench-limited"
        if group.exists():
            group.rmdir()  # empty since its last point ended: fresh peak and kill counters
        group.mkdir()
        (group / "memory.max").write_text(str(limit_bytes))
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0")
        return group
    group = root / "memory" / "bench-limited"  # cgroup v1
    if group.exists():
        group.rmdir()  # fresh peak and kill counters
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    return group


def failure_reason(output, exit_code):
    if "OutOfMemoryError" in output or "CUDA out of memory" in output:
        return "CUDA out of memory"
    if "BENCH_HOST_LIMIT_HIT" in output:
        return "killed by the watchdog: host RSS passed the limit"
    if exit_code in (-9, 137):
        return "killed (host RAM: kernel OOM killer, or the cgroup's limit)"
    return output.strip().splitlines()[-1] if output.strip() else f"exit code {exit_code}"


def describe(name, point):
    import deepspeed
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "point": name, "setup": point["setup"], "gpu": gpu, "gpus": point.get("gpus", 1),
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "deepspeed": deepspeed.__version__, "python": sys.version.split()[0]},
        "vram_budget_gib": point["budget"], "per_device_batch": point["batch"],
        "grad_accum": point["accumulation"], "seq_len": SEQ_LEN, "cpu_threads": torch.get_num_threads(),
        "optimizer_steps": point["steps"], "model_overrides": point.get("config", {}),
        # finetune.py's memory savers; the original project had none
        "loss": "model's own" if point["setup"] == "original" else "memory_savers.causal_lm_loss (in chunks)",
        "activation": "gelu_new" if point["setup"] == "original" else "gelu_pytorch_tanh",
        "command": f"python bench/gpu_bench.py {name}",
        "samples": ZIPF_SAMPLES if point.get("data") == "zipf" else "uniformly random tokens",
        **({"ds_overrides": point["ds"]} if point.get("ds") and point["setup"] != "original" else {}),
        **({"lora_overrides": point["lora"]} if point.get("lora") else {}),
        **({"training_overrides": point["training"]} if point.get("training") else {}),
        **({"compiled": "each GPTJBlock's attn and mlp, torch.compile (Inductor)"} if point.get("compile_blocks") else {}),
        **({"fp8": "each GPTJBlock's Linear layers, torchao Float8Linear (dynamic tensorwise scaling)"}
           if point.get("fp8") else {}),
    }


def run_point(name):
    """In the point's own process: cap the allocator, train a few steps with finetune.py's code, measure."""
    import torch

    import ds_config
    import finetune
    import memory_savers
    import plan

    point = point_settings(name)
    rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)  # the cap applies to the current device
        if point["budget"]:
            total = torch.cuda.get_device_properties(0).total_memory
            allocator_cap = (point["budget"] - OUTSIDE_ALLOCATOR_GIB) * 2**30
            torch.cuda.set_per_process_memory_fraction(allocator_cap / total)
    original = point["setup"] == "original"
    setup = {"name": "ram", **plan.SETUPS["ram"]} if original else {"name": point["setup"], **plan.SETUPS[point["setup"]]}
    config = merge(ds_config.deepspeed_config(setup, NVME_PATH), point.get("ds", {}))
    if not original:
        memory_savers.lean_zero3_overflow_check()  # as finetune.main() does
    finetune.FILES.update(out_dir="/tmp/bench-out", checkpoint_dir="/tmp/bench-checkpoints")
    finetune.CHECKPOINTS["every_steps"] = None  # a GPT-J checkpoint is ~97 GB: not what is measured here
    record = describe(name, point)
    record["pin_memory"] = config["zero_optimization"]["offload_param"].get("pin_memory")
    batch = point["batch"]
    finetune.TRAINING.update(per_device_train_batch_size=batch, gradient_accumulation_steps=point["accumulation"],
                             per_device_eval_batch_size=batch,
                             max_steps=point["steps"], logging_steps=1, **point.get("training", {}))
    lora_training = finetune.LORA_TRAINING if setup["lora"] else {}  # as finetune.main(); the point's own last
    arguments = finetune.training_arguments(config, {**finetune.TRAINING, **lora_training, **point.get("training", {})})
    arguments.report_to = []  # no TensorBoard files for a benchmark
    lora = {**finetune.LORA, **point.get("lora", {})} if setup["lora"] else None
    model = build_gptj(arguments, point.get("config", {}), lora, one_kernel_gelu=not original)
    if point.get("fp8"):
        from torchao.float8 import convert_to_float8_training

        # The blocks' Linear layers only (their dimensions are multiples of 16, as FP8 matmuls need).
        convert_to_float8_training(model, module_filter_fn=lambda module, name: ".h." in f".{name}")
        print(f"fp8: {sum(type(m).__name__ == 'Float8Linear' for m in model.modules())} Linear layers", flush=True)
    if point.get("compile_blocks"):
        # Dynamo guards each ZeRO-3 parameter's integer `ds_id` as a constant: one graph per block (torch 2.11),
        # past the default limit of 8, after which it runs the other blocks eagerly.
        torch._dynamo.config.recompile_limit = 4 * len(model.transformer.h)  # 28 graphs a function measured
        for block in model.transformer.h:  # inside gradient checkpointing, which stays eager; ZeRO-3's hooks too
            block.attn.forward, block.mlp.forward = torch.compile(block.attn.forward), torch.compile(block.mlp.forward)
    samples = random_samples(batch * point["accumulation"] * point["steps"] * gpus, model.config.vocab_size,
                             zipf=point.get("data") == "zipf")
    disk_folder = NVME_PATH if setup["name"] == "disk" else None
    watcher, timer, started = MemoryWatcher(rank, disk_folder), StepTimer(), time.time()
    callbacks = [timer, *([HostActivations(point["host_activations"])] if point.get("host_activations") else [])]
    try:
        trainer = finetune.train(model, None, samples, arguments, callbacks=callbacks,  # no tokenizer: not saved
                                 loss=None if original else memory_savers.causal_lm_loss)
    except SystemExit as stopped:  # finetune.train's own stop(): CUDA OOM and the like, said in words
        watcher.stop()
        if stopped.__context__ is not None:  # where it ran out, for the log
            traceback.print_exception(stopped.__context__)
        record.update(ok=False, failure=str(stopped).strip().splitlines()[0][:300],
                      peak_total_gpu_mib=round(watcher.peak_used / 2**20))
        print("BENCH_RECORD " + json.dumps(record), flush=True)
        return
    record.update(measure(point, batch, gpus, model, timer, watcher, started))
    if point.get("compile_blocks"):  # how many graphs Dynamo made: 56 on the GPU, one per block and function
        from torch._dynamo.utils import counters
        record["dynamo_stats"] = dict(counters["stats"])
    if point.get("save"):
        record.update(timed_save(trainer, setup))
    if rank == 0:
        print("BENCH_RECORD " + json.dumps(record), flush=True)


def timed_save(trainer, setup):
    """finetune.save()'s memory-heavy part: the optimizer state dropped, the 16-bit weights gathered and written."""
    import memory_savers

    started = time.time()
    memory_savers.drop_optimizer_state(trainer)
    trainer.save_model("/tmp/bench-out/lora_adapter" if setup["lora"] else "/tmp/bench-out")
    return {"save_s": round(time.time() - started, 1),
            "host_rss_peak_after_save_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1)}


def measure(point, batch, gpus, model, timer, watcher, started):
    """The figures of a finished run: its last optimizer step (steady), memory peaks, losses."""
    import torch

    micro = [m for m in timer.micro_steps if m["step"] == point["steps"]]  # the last, steady optimizer step
    step_seconds = sum(m["seconds"] for m in micro)
    plain = [m for m in micro if not m["boundary"]] or micro  # micro-steps without the optimizer step
    micro_step_s = sum(m["seconds"] for m in plain) / len(plain)
    forward_s = sum(m["forward_s"] for m in plain) / len(plain)
    tokens = batch * point["accumulation"] * gpus * SEQ_LEN
    tokens_per_s = tokens / step_seconds
    peak_total_mib = watcher.peak_used / 2**20
    # FLOP per token: forward 2N, backward 4N (2N for LoRA: no weight gradients), recomputed forward 2N.
    lora = point["setup"].startswith("lora")
    flop_per_token = (6 if lora else 8) * model_parameters(model)
    budget_mib = point["budget"] * 1024 if point["budget"] else float("inf")
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "step_s": round(step_seconds, 2),
        "micro_step_s": round(micro_step_s, 3),
        "forward_s": round(forward_s, 3),
        "backward_s": round(micro_step_s - forward_s, 3),
        "optimizer_s": round(micro[-1]["seconds"] - micro_step_s, 3),  # the boundary micro-step's extra time
        "mfu": round(tokens_per_s * flop_per_token / (PEAK_FLOPS * gpus), 4),  # per GPU
        "peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20) if torch.cuda.is_available() else None,
        "peak_total_gpu_mib": round(peak_total_mib),
        "host_rss_peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
        "host_rss_at_gib": timer.rss_at,  # after the engine was built, after each optimizer step
        "disk_io_at_gb": timer.disk_io_at,  # read and written so far, at the same moments
        "gpu_peak_allocated_at_mib": timer.gpu_peak_at,  # PyTorch's peak so far, after each step
        "loss_scale_at": timer.loss_scale_at,  # FP16's scale after each step: halved = overflow caught, skipped
        "host_available_min_gib": round(watcher.min_available / 2**30, 1),
        "host_used_peak_gib": round((plan.meminfo("MemTotal") - watcher.min_available) / 2**30, 1),  # all ranks
        "nvme_peak_gb": round(watcher.peak_disk / 1e9, 1) if watcher.disk_folder else None,
        "losses": [entry["loss"] for entry in timer.logs if "loss" in entry],
        "ok": peak_total_mib <= budget_mib,
        "train_wall_s": round(time.time() - started, 1),
        "micro_steps": micro,
    }


def build_gptj(arguments, overrides, lora, one_kernel_gelu=True):
    """GPT-J-6B's architecture with random weights (seeded: every point starts from the same model), FP16,
    built partitioned (zero.Init) as from_pretrained would; LoRA (finetune.py's LORA dict, or None) adds
    the adapters as finetune.py does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GPTJConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    import memory_savers

    torch.manual_seed(0)
    config = GPTJConfig(use_cache=False, **overrides)  # the defaults are GPT-J-6B: 28 layers, 4096 wide, 50,400 tokens
    if one_kernel_gelu:  # as finetune.load_model does; the original project kept GPT-J's 8-operation gelu_new
        config = memory_savers.one_kernel_gelu(config)
    dtype = torch.float16 if arguments.fp16 else torch.bfloat16 if arguments.bf16 else torch.float32
    # ZeRO-3 builds each layer partitioned on the GPU (zero.Init). LoRA's ZeRO-2 would build all 6 billion
    # random weights on the CPU, which took the GPU machine over 170 s a point, so they are built on the GPU.
    # The product reads the real weights into RAM first (that host RAM: the "lora" records before the 13th session).
    on_gpu = torch.cuda.is_available() and not is_deepspeed_zero3_enabled()
    with torch.device("cuda" if on_gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora:  # as finetune.load_model
        model = get_peft_model(model, LoraConfig(**lora), autocast_adapter_dtype=False)
    return model


def model_parameters(model):
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())  # 6.05e9


def random_samples(count, vocab_size, zipf=False):
    """count samples of SEQ_LEN tokens, each new: uniformly random, or drawn from a Zipf distribution
    (ZIPF_SAMPLES) over the vocabulary in a random order."""
    import torch
    from datasets import Dataset, DatasetDict

    generator = torch.Generator().manual_seed(0)
    if zipf:
        rank_of_token = torch.randperm(vocab_size, generator=generator)
        probabilities = 1.0 / (rank_of_token + 1.0) ** ZIPF_EXPONENT
        ids = torch.multinomial(probabilities, count * SEQ_LEN, replacement=True, generator=generator)
        ids = ids.view(count, SEQ_LEN).tolist()
    else:
        ids = torch.randint(0, vocab_size, (count, SEQ_LEN), generator=generator).tolist()
    train = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * SEQ_LEN] * count, "labels": ids})
    return DatasetDict({"train": train, "validation": train.select([])})


def merge(base, overrides):
    for key, value in overrides.items():
        base[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


class MemoryWatcher:
    """Polls the driver's view of GPU memory (whole process: allocator + context + NCCL) and host RAM."""

    def __init__(self, device, disk_folder=None, every_s=0.05):
        import torch

        self.peak_used, self.min_available, self.peak_disk, self.running = 0, float("inf"), 0, True
        self.torch, self.device, self.disk_folder, self.every_s = torch, device, disk_folder, every_s
        self.host_limit = float(os.environ.get("BENCH_HOST_LIMIT_GIB", "inf")) * 2**30  # host_limit()'s watchdog
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        import psutil

        polls = 0
        while self.running:
            if self.torch.cuda.is_available():
                free, total = self.torch.cuda.mem_get_info(self.device)  # this rank's GPU
                self.peak_used = max(self.peak_used, total - free)
            self.min_available = min(self.min_available, plan.meminfo("MemAvailable"))
            if psutil.Process().memory_info().rss > self.host_limit:
                print("BENCH_HOST_LIMIT_HIT", flush=True)
                os.kill(os.getpid(), 9)
            if self.disk_folder and polls % 20 == 0:  # the NVMe offload's files, once a second
                self.peak_disk = max(self.peak_disk, disk_used(self.disk_folder))
            polls += 1
            time.sleep(self.every_s)

    def stop(self):
        self.running = False
        self.thread.join()


def disk_used(folder):
    used = 0
    for root, _, files in os.walk(folder):
        for file in files:
            try:
                used += os.stat(os.path.join(root, file)).st_blocks * 512
            except FileNotFoundError:  # swapped out and removed meanwhile
                pass
    return used


def rss_gib():
    import psutil

    return round(psutil.Process().memory_info().rss / 2**30, 1)


def disk_io_gb():
    """GB this process (all its threads, DeepSpeed's async I/O ones too) has read from and written to
    storage so far."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"read": round(int(fields["read_bytes"]) / 1e9, 2), "written": round(int(fields["write_bytes"]) / 1e9, 2)}


def gpu_peak_mib():
    """PyTorch's peak allocated GPU memory so far, in MiB (None on a CPU)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None


def loss_scale(optimizer):
    """FP16's current loss scale, from the DeepSpeed optimizer inside the Trainer's wrappers (None without)."""
    while optimizer is not None and not hasattr(optimizer, "loss_scale"):
        optimizer = getattr(optimizer, "optimizer", None)
    scale = getattr(optimizer, "loss_scale", None)
    return float(scale) if scale is not None else None


def step_timer_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of every micro-step and of its forward pass (both synchronized with the GPU).
        backward = micro-step - forward; the boundary micro-step also holds the optimizer step."""

        def __init__(self):
            self.micro_steps, self.logs, self.last, self.forward_s = [], [], None, 0.0
            self.rss_at, self.disk_io_at, self.loss_scale_at, self.gpu_peak_at = {}, {}, {}, {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(lambda *_: setattr(self, "forward_started", self.now()))
            model.register_forward_hook(lambda *_: setattr(self, "forward_s", self.now() - self.forward_started))
            self.rss_at["engine built"], self.disk_io_at["engine built"] = rss_gib(), disk_io_gb()

        def on_step_begin(self, args, state, control, **kwargs):
            self.last = self.last or self.now()

        def on_substep_end(self, args, state, control, **kwargs):
            self.record(state.global_step + 1, boundary=False)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            self.record(state.global_step, boundary=True)
            self.rss_at[f"step {state.global_step}"] = rss_gib()
            self.disk_io_at[f"step {state.global_step}"] = disk_io_gb()
            self.loss_scale_at[f"step {state.global_step}"] = loss_scale(optimizer)
            self.gpu_peak_at[f"step {state.global_step}"] = gpu_peak_mib()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

        def record(self, step, boundary):
            now = self.now()
            self.micro_steps.append({"step": step, "seconds": round(now - self.last, 3),
                                     "forward_s": round(self.forward_s, 3), "boundary": boundary})
            self.last = now

        def now(self):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

    return StepTimer


def host_activations_class():
    import torch
    from transformers import TrainerCallback

    def pack(tensor):  # what autograd saves for backward: on the GPU -> pinned host RAM, weights apart
        weight = isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter)  # W.t()
        if weight or tensor.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    class HostActivations(TrainerCallback):
        """The last `layers` GPT-J blocks run without activation checkpointing (no recompute in backward),
        what they save kept in pinned host RAM instead of the GPU's; set once the Trainer has turned
        checkpointing on for every block. The copies run on the compute stream (as torch's save_on_cpu):
        none overlaps compute, so this measures the lever's worst case (bench/RESULTS.md: its best case)."""

        def __init__(self, layers):
            self.layers = layers

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            blocks = model.get_decoder().h if hasattr(model, "get_decoder") else model.transformer.h
            for block in blocks[-self.layers:]:
                block.gradient_checkpointing = False

                def hosted(*inputs, forward=block.forward, **keywords):
                    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                        return forward(*inputs, **keywords)

                block.forward = hosted
            print(f"host_activations: blocks {len(blocks) - self.layers}-{len(blocks) - 1} of {len(blocks)} not "
                  f"recomputed, what they save for backward in pinned host RAM", flush=True)

    return HostActivations


if __name__ == "__main__":
    if "--point" in sys.argv:  # a point's own process (the launcher may add --local_rank=N first)
        StepTimer, HostActivations = step_timer_class(), host_activations_class()
        run_point(sys.argv[sys.argv.index("--point") + 1])
        failures.leave_together()  # as finetune.main() ends: left open, exit hung ~5 min, then aborted
    else:
        main(sys.argv[1:])
