"""Started by the tests through DeepSpeed's launcher: finetune.main() with its dicts updated from a JSON file.

    deepspeed --num_gpus 1 tests/run_finetune.py settings.json   # {"MODEL": {...}, "TRAINING": {...}, ...}
"""

import json
import sys
from pathlib import Path

import finetune

if __name__ == "__main__":
    settings = json.loads(Path(sys.argv[-1]).read_text())  # the launcher puts --local_rank=N before it
    for dict_name, values in settings.items():
        getattr(finetune, dict_name).update(values)
    finetune.main()
