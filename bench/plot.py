"""bench/results.json -> bench/results.png: per-device batch vs GPU memory, and vs tokens/s.

    pip install matplotlib && python bench/plot.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in json.loads((HERE / "results.json").read_text()) if r.get("ok") and r["gpus"] == 1]
    figure, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    current = lambda r: "loss" in r and "note" not in r  # finetune.py with causal_lm_loss and one_kernel_gelu
    series = (("ours", lambda r: r["settings"] == "ours" and current(r) and not r.get("pin_memory"), "o", "tab:blue"),
              ("ours, host memory pinned", lambda r: r["settings"] == "ours" and r.get("pin_memory"), "*", "navy"),
              ("ours, before the loss in chunks", lambda r: r["settings"] == "ours" and "loss" not in r, "o", "lightsteelblue"),
              ("original", lambda r: r["settings"] == "original", "s", "tab:orange"),
              ("ours-lowram", lambda r: r["settings"] == "ours-lowram", "v", "tab:red"),
              ("ours-lora", lambda r: r["settings"] == "ours-lora", "D", "tab:green"))
    for settings, chosen, marker, color in series:
        points = sorted((r for r in records if chosen(r)), key=lambda r: r["per_device_batch"])
        batches = [r["per_device_batch"] for r in points]
        memory.plot(batches, [r["peak_total_gpu_mib"] / 1024 for r in points], marker=marker, color=color,
                    label=f"{settings}: whole process (driver)")
        memory.plot(batches, [r["peak_allocated_mib"] / 1024 for r in points], marker=marker, color=color, linestyle=":",
                    label=f"{settings}: PyTorch allocated")
        steady = [r for r in points if r["grad_accum"] >= 8 or settings == "ours-lora"]  # LoRA: no CPU Adam step
        if not points:
            continue
        speed.plot([r["per_device_batch"] for r in steady], [r["tokens_per_s"] for r in steady], marker=marker, color=color,
                   linestyle="none", markersize=9, label=f"{settings} (GA {', '.join(str(r['grad_accum']) for r in steady)})")
    for budget in (8, 12, 16, 24):
        memory.axhline(budget, color="grey", linewidth=0.6)
        memory.text(0.6, budget + 0.2, f"{budget} GiB budget", fontsize=7, color="grey")
    memory.set(xlabel="per-device batch (seq 2048)", ylabel="peak GPU memory, GiB", title="GPU memory vs batch")
    speed.set(xlabel="per-device batch (seq 2048)", ylabel="tokens/s (steady optimizer step)",
              title="Speed vs batch (within 16 and 24 GiB budgets)", ylim=(0, 11000), xlim=(0, 28))
    memory.legend(fontsize=7)
    speed.legend(fontsize=7, loc="lower right")
    gpu = records[0]["gpu"] if records else "?"
    figure.suptitle(f"GPT-J-6B, full fine-tuning (ZeRO-3 offload) and LoRA, one {gpu} (measured {records[0]['date'] if records else ''})", fontsize=9)
    figure.tight_layout()
    figure.savefig(HERE / "results.png", dpi=110)
    print(f"wrote {HERE / 'results.png'}")


if __name__ == "__main__":
    main()
