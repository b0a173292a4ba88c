"""The curves a user looks at: TensorBoard's event files and a PNG of the losses, beside the model.

While it trains, the Trainer writes TensorBoard's files to checkpoint_dir/runs/
(`tensorboard --logdir checkpoints/runs`, a folder per start of the run); at the end they are
copied to out/tensorboard/, and out/loss.png shows the training loss per optimizer step and the
validation loss at each evaluation.
"""

import shutil
from pathlib import Path

LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"  # in out/
TRAINER_RUNS = "runs"  # in the Trainer's output_dir, finetune.py's checkpoint_dir


def save(folder, log_history, checkpoint_dir):
    """loss.png from the Trainer's log, and TensorBoard's files, into folder (out.partial/)."""
    runs = Path(checkpoint_dir) / TRAINER_RUNS
    if runs.is_dir():
        shutil.copytree(runs, Path(folder) / TENSORBOARD)
    plot_losses(log_history, Path(folder) / LOSS_PLOT)


def plot_losses(log_history, path):
    import matplotlib

    matplotlib.use("Agg")  # a file, no screen
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    validation = [(entry["step"], entry["eval_loss"])
                  for entry in log_history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for points, label, style in ((train, "training loss", "-"),
                                 (validation, "validation loss", "o--")):
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=4)
    axes.set(xlabel="optimizer step", ylabel="loss", title="Fine-tuning loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
