"""What finetune.py's SETUP = "auto" picks for GPT-J-6B on this machine, as finetune.py prints it.

    python bench/plan_here.py [FULL_BATCH ...]

The same plan.py calls finetune.main() makes before it loads weights, on GPTJConfig() (no download), with
finetune.py's TRAINING and MACHINE (set MACHINE["gpu"] to see another card's plan).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune  # noqa: E402
import plan  # noqa: E402


def main(full_batches):
    from transformers import GPTJConfig

    parameters, machine = plan.count_parameters(GPTJConfig()), plan.this_machine(finetune.MACHINE)
    for full_batch in full_batches or [finetune.FULL_BATCH]:
        print(f"== FULL_BATCH = {full_batch}")
        try:
            print(plan.choose_setup(finetune.SETUP, parameters, {"block_size": 2048}, finetune.TRAINING,
                                    full_batch, machine)["report"])
        except SystemExit as stopped:
            print(stopped)


if __name__ == "__main__":
    main([int(full_batch) for full_batch in sys.argv[1:]])
