"""bench/results.json -> bench/results.png: per-device batch vs GPU memory, and vs tokens/s.

    pip install matplotlib && python bench/plot.py
    python bench/plot.py states [RESULTS PNG RUN SHAPE]  # the loss curves of product_run.py's state runs of one
                                                    # set-up and model (RUN: run-ram-optimizer-24.0; SHAPE: -14layers)
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in json.loads((HERE / "results.json").read_text()) if r.get("ok") and r["gpus"] == 1]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = (("ram (offloaded to RAM)", lambda r: setup(r) == "ram", "o", "tab:blue"),
              ("ram-pinned", lambda r: setup(r) == "ram-pinned", "*", "navy"),
              ("lora (model on the GPU)", lambda r: setup(r) == "lora", "D", "tab:green"),
              ("lora-ram (model streamed from RAM)", lambda r: setup(r) == "lora-ram", "P", "olive"),
              ("disk (optimizer state on disk)", lambda r: setup(r) == "disk", "v", "tab:red"),
              ("original project", lambda r: setup(r) == "original", "s", "tab:orange"))
    for label, chosen, marker, color in series:
        points = sorted((r for r in records if chosen(r) and r.get("vram_budget_gib")),
                        key=lambda r: r["per_device_batch"])
        if not points:
            continue
        batches = [r["per_device_batch"] for r in points]
        memory.plot(batches, [r["peak_total_gpu_mib"] / 1024 for r in points], marker=marker, color=color,
                    linestyle="none", label=f"{label}: whole process (driver)")
        steady = [r for r in points if r["grad_accum"] >= 8 or setup(r).startswith("lora")]  # LoRA: no CPU Adam
        speed.plot([r["per_device_batch"] for r in steady], [r["tokens_per_s"] for r in steady], marker=marker,
                   color=color, linestyle="none", markersize=9, label=label)
    for budget in (8, 12, 16, 24):
        memory.axhline(budget, color="grey", linewidth=0.6)
        memory.text(0.6, budget + 0.2, f"{budget} GiB budget", fontsize=7, color="grey")
    memory.set(xlabel="per-device batch (seq 2048)", ylabel="peak GPU memory, GiB", title="GPU memory vs batch")
    speed.set(xlabel="per-device batch (seq 2048)", ylabel="tokens/s (steady optimizer step)",
              title="Speed vs batch (each within its budget)", ylim=(0, 14000), xlim=(0, 28))
    memory.legend(fontsize=7)
    speed.legend(fontsize=7, loc="lower right")
    gpu = records[0]["gpu"] if records else "?"
    dates = sorted({r["date"] for r in records})
    figure.suptitle(f"GPT-J-6B, full fine-tuning and LoRA (ZeRO-3), one {gpu} capped to each budget "
                    f"(measured {dates[0]} to {dates[-1]}; latest code path per set-up)", fontsize=9)
    figure.tight_layout()
    figure.savefig(HERE / "results.png", dpi=110)
    print(f"wrote {HERE / 'results.png'}")


def setup(record):
    """The set-up a record measured; records of earlier sessions named the code paths otherwise, and only
    the latest version of each is drawn (the loss in chunks; LoRA through ZeRO-3)."""
    if "setup" in record:
        return record["setup"]
    if "note" in record or "loss" not in record:
        return "earlier version"
    old = {"ours": "ram-pinned" if record.get("pin_memory") else "ram", "original": "original",
           "ours-lowram": "disk", "ours-lora": "lora, plain Trainer (earlier)"}
    return old.get(record["settings"], record["settings"])


def states(results=HERE / "results.json", picture=HERE / "states.png", run="run-ram-optimizer-24.0", shape=""):
    """Training and validation loss per optimizer step of each `product_run.py state` run whose point is
    `run`-VARIANT`shape` (the same set-up, card budget and model; shape: e.g. -14layers), newest of each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for record in json.loads(Path(results).read_text()):
        variant = record["command"].split()[3] if "product_run.py state" in record.get("command", "") else ""
        if record.get("ok") and record["point"] == f"{run}-{variant}{shape}":
            runs[variant] = record
    figure, (train, validation) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, record in runs.items():
        train.plot(range(1, len(record["losses"]) + 1), record["losses"], linewidth=0.8, label=variant)
        steps, losses = zip(*record["validation_losses"])
        validation.plot(steps, losses, marker="o", label=f"{variant}: {losses[-1]:.4f}")
    train.set(xlabel="optimizer step", ylabel="training loss", title="Training loss")
    validation.set(xlabel="optimizer step", ylabel="validation loss", title="Validation loss (after each epoch)")
    train.legend(fontsize=7), validation.legend(fontsize=7)
    first = next(iter(runs.values()))
    every = [loss for record in runs.values() for _, loss in record["validation_losses"]]
    if max(every) > 3 * min(every):  # a random model's first loss (~11) would flatten the rest
        validation.set_yscale("log")
    figure.suptitle(f"{first['model']}\n{first['data']}, {first['gpu']}; {first['setup']} in bf16, "
                    f"{str(first['vram_budget_gib']) + ' GiB' if first['vram_budget_gib'] else 'whole card'}: {', '.join(runs)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(picture, dpi=110)
    print(f"wrote {picture}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["states"]:
        states(*sys.argv[2:])
    else:
        main()
