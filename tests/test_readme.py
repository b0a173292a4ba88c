"""README.md quotes what the code prints."""

import re

from transformers import GPTJConfig

import finetune
import plan
from conftest import REPO


def test_readmes_plan_for_a_24_gib_gpu_and_64_gib_of_ram_is_what_the_planner_prints():
    readme = (REPO / "README.md").read_text()
    quoted = re.search(r"<!-- plan: 24 GiB GPU, 64 GiB RAM, the default TRAINING -->\n```\n(.*?)\n```", readme,
                       re.DOTALL).group(1)
    machine = {"host_ram_gib": 64, "gpu_memory_gib": 24, "processes_on_host": 1, "gpus": 1}
    printed = plan.choose_setup("auto", plan.count_parameters(GPTJConfig()), 2048, finetune.TRAINING, machine)
    assert quoted == printed["report"]
