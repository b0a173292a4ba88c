"""What the product replaces in its libraries at run time, all of it (README: "What we change in the libraries"),
each written against the version requirements.txt pins. If an original changes (a new version), its test here
fails: read the new code before moving the pin. The tests that show each replacement behaves as the original
are named beside it."""

import ast
import hashlib
import importlib
import inspect

import pytest

import failures
import memory_savers

# (module, function, the pinned package and version, SHA-256 of the original's source (first 16 hex digits),
#  who replaces it, the test that shows the replacement still does what the original did)
PATCHES = [
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3.has_overflow", "deepspeed", "0.19.8",
     "7e2de895e8f80597", "memory_savers.lean_zero3_overflow_check",
     "test_finetune.py::test_lean_overflow_check_gives_deepspeeds_verdicts (+inf, -inf, nan, finite; "
     "fp32 and FP16)"),
    ("deepspeed.comm.torch", "build_shm_op", "deepspeed", "0.19.8", "5ee7daeb8dd5b011",
     "failures.silence_false_alarms (what it prints dropped)",
     "test_multinode.py::test_two_nodes_train_what_two_processes_on_one_node_train (and its line is gone: "
     "test_runs_print_no_false_alarms)"),
    ("deepspeed.ops.op_builder.builder", "OpBuilder.jit_load", "deepspeed", "0.19.8", "a04131155ae4a28e",
     "failures.announce_op_builds (a line before a first compile)", "test_resume.py::test_optimizer_state_on_disk_gives_the_same_model_and_resumes (the op it builds runs)"),
    ("huggingface_hub.constants", "is_offline_mode", "huggingface_hub", "2.4.0", "caafb063cb07b668",
     "failures.model_within_reach sets huggingface_hub.constants.HF_HUB_OFFLINE, which this reads, when the hub "
     "does not answer", "test_noise.py::test_a_hub_name_without_network_is_said_within_seconds"),
]


def original_source(module_name, qualified_name):
    """The function's source as the installed library has it (read from its file, not from the object,
    which may already be replaced in this process)."""
    source = inspect.getsource(importlib.import_module(module_name))
    nodes, node = ast.parse(source).body, None
    for name in qualified_name.split("."):
        node = next(item for item in nodes if isinstance(item, (ast.ClassDef, ast.FunctionDef)) and item.name == name)
        nodes = node.body
    return ast.get_source_segment(source, node)


@pytest.mark.parametrize("module_name, qualified_name, package, version, digest, replaced_by, shown_by", PATCHES)
def test_each_replaced_function_is_the_version_it_was_written_for(module_name, qualified_name, package, version,
                                                                  digest, replaced_by, shown_by):
    assert importlib.import_module(package).__version__ == version
    source = original_source(module_name, qualified_name)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, (
        f"{module_name}.{qualified_name} changed: read it again before keeping {replaced_by} ({shown_by})")


def test_the_replacements_are_installed_where_the_list_says():
    from deepspeed.ops.op_builder.builder import OpBuilder
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    failures.silence_false_alarms()
    memory_savers.lean_zero3_overflow_check()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op.quiet
    assert OpBuilder.jit_load.announced
    assert DeepSpeedZeroOptimizer_Stage3.has_overflow.lean
