"""What finetune.py's SETUP = "auto" picks for GPT-J-6B on this machine, as finetune.py prints it.

    python bench/plan_here.py [per_device_train_batch_size ...]

The same plan.py calls finetune.main() makes before it loads weights, on GPTJConfig() (no download).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune  # noqa: E402
import plan  # noqa: E402


def main(batches):
    from transformers import GPTJConfig

    parameters, machine = plan.count_parameters(GPTJConfig()), plan.this_machine(finetune.MACHINE)
    for batch in batches or [finetune.TRAINING["per_device_train_batch_size"]]:
        training = {**finetune.TRAINING, "per_device_train_batch_size": batch}
        print(f"== per_device_train_batch_size={batch}")
        try:
            print(plan.choose_setup(finetune.SETUP, parameters, 2048, training, machine)["report"])
        except SystemExit as stopped:
            print(stopped)


if __name__ == "__main__":
    main([int(batch) for batch in sys.argv[1:]])
