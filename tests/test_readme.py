"""README.md quotes what the code prints."""

import re

from transformers import GPTJConfig

import finetune
import plan
from conftest import REPO


def test_readmes_plan_for_a_4090_and_64_gib_of_ram_is_what_the_planner_prints():
    readme = (REPO / "README.md").read_text()
    quoted = re.search(r"<!-- plan: RTX 4090, 64 GiB RAM, 16 CPU threads, the default settings -->\n```\n(.*?)\n```",
                       readme, re.DOTALL).group(1)
    machine = plan.this_machine({"host_ram_gib": 64, "gpu_memory_gib": None, "gpu": "RTX 4090", "cpu_threads": 16})
    printed = plan.choose_setup("auto", plan.count_parameters(GPTJConfig()), {"block_size": 2048}, finetune.TRAINING,
                                finetune.FULL_BATCH, machine)
    assert quoted == printed["report"]
