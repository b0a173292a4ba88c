"""Two machines, tested on one: two `deepspeed --no_ssh --node_rank N` launchers, one process each.

Each "node" is started as README tells for real machines (a hostfile of two hosts, the first
node's address and port), without ssh, over gloo. Node 1 gets its own out/ and checkpoints/ folders,
as if it had a disk of its own, so that whatever it writes shows (without checkpoints, which need a
shared checkpoint_dir: finetune.py stops before loading if it is not); the resume test gives both
nodes the same folders, as a shared disk would. The reference: `deepspeed --num_gpus 2` on one node.
"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import REPO, free_port, run_finetune
from test_finetune import make_dataset, settings_for

# 52 samples, 4 a device x 2 accumulation x 2 processes = 16 a step: 4 steps an epoch, 8 in 2.
RUN = {"num_train_epochs": 2}
# Two nodes and one node of two processes run the same arithmetic over gloo: measured gap 0.0 on
# every weight and loss (4 runs), while training moves weights by up to 0.01. The tolerance only
# allows for thread scheduling.
TOLERANCE = 1e-6


def run_two_nodes(settings_per_node, timeout=600, expect_failure=False):
    """`deepspeed --hostfile H --no_ssh --node_rank N --master_addr 127.0.0.1 --master_port P
    tests/run_finetune.py node-N.settings.json` for N = 0 and 1 at once, as on two machines."""
    folder = Path(settings_per_node[0]["FILES"]["out_dir"]).parent
    hostfile = folder / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # without ssh, nobody looks the names up
    environment = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    environment.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    port, nodes = str(free_port()), []
    for rank, settings in enumerate(settings_per_node):
        settings_file = folder / f"node-{rank}.settings.json"
        settings_file.write_text(json.dumps(settings))
        command = ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                   "--master_addr", "127.0.0.1", "--master_port", port,
                   str(REPO / "tests" / "run_finetune.py"), str(settings_file)]
        nodes.append(subprocess.Popen(command, env=environment, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:  # a node left waiting for one that died: ended with its launcher
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    for rank, (node, output) in enumerate(zip(nodes, outputs)):
        assert (node.returncode != 0) == expect_failure, (
            f"node {rank} {'failed' if node.returncode else 'did not fail'} ({node.returncode}):\n"
            f"{output[-6000:]}")
    return outputs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_model):
    with pytest.MonkeyPatch.context() as monkeypatch:
        configure = lambda settings, **values: [monkeypatch.setitem(settings, key, value)
                                                for key, value in values.items()]
        return make_dataset(tmp_path_factory.mktemp("multinode-data"), tiny_model, configure)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, dataset):
    """The same settings as two nodes of one process and as one node of two processes."""
    tmp_path, dataset_dir = tmp_path_factory.mktemp("multinode"), dataset
    one_node = tmp_path / "one-node"
    one_node_output = run_finetune(settings_for(one_node, tiny_model, dataset_dir, **RUN), gpus=2)
    nodes = [tmp_path / "two-nodes" / f"node-{rank}" for rank in (0, 1)]
    for folder in nodes:
        folder.mkdir(parents=True)
    outputs = run_two_nodes([{**settings_for(folder, tiny_model, dataset_dir, **RUN),
                              "CHECKPOINTS": {"every_steps": None}}  # the fix for disks of their own
                             for folder in nodes])
    return {"one-node": (one_node, one_node_output), "dataset": dataset_dir,
            "node-0": (nodes[0], outputs[0]), "node-1": (nodes[1], outputs[1])}


def losses(out_dir):
    log = json.loads((out_dir / "finetune_log.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in log if "loss" in entry}


def largest_gap(out_dir, reference_dir):
    weights = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(reference_dir).state_dict()
    return max((weights[name] - reference[name]).abs().max().item() for name in reference)


def test_two_nodes_train_what_two_processes_on_one_node_train(runs, tiny_model):
    (one_node, _), (node_0, output) = runs["one-node"], runs["node-0"]
    assert "x 2 processes (CPU) = full batch of 16 samples" in output  # both nodes are counted
    # Every sample once an epoch: the printed plan is what the Trainer did (4 steps an epoch).
    planned = int(re.search(r"optimizer steps per epoch, (\d+) in 2 epoch", output).group(1))
    assert planned == 8 and sorted(losses(node_0 / "out")) == list(range(1, planned + 1))
    assert losses(node_0 / "out") == pytest.approx(losses(one_node / "out"), abs=TOLERANCE)
    gap = largest_gap(node_0 / "out", one_node / "out")
    moved = largest_gap(node_0 / "out", tiny_model)
    print(f"two nodes vs one node of two processes: largest weight gap {gap:.1e} "
          f"(training moved weights by up to {moved:.3f})")
    assert gap <= TOLERANCE and moved > 5e-3
    log = json.loads((node_0 / "out" / "finetune_log.json").read_text())
    assert log["validation_loss_after"] < log["validation_loss_before"] - 0.3


def test_only_the_first_node_writes_out(runs):
    (node_0, output_0), (node_1, output_1) = runs["node-0"], runs["node-1"]
    assert f"Saved the fine-tuned model and tokenizer to {node_0 / 'out'}/." in output_0
    assert (node_0 / "out" / "model.safetensors").is_file()
    assert not (node_0 / "checkpoints").exists()
    assert "Saved the fine-tuned model" not in output_1 and "Batch plan" not in output_1
    assert not (node_1 / "out").exists() and not (node_1 / "out.partial").exists()
    assert not (node_1 / "checkpoints").exists()


def test_runs_print_no_false_alarms(runs):
    """failures.silence_false_alarms: DeepSpeed's "... built successfully" on every run (it only
    loaded its op), Accelerate's accumulation "mismatch" and PyTorch's deprecation notices for
    DeepSpeed's calls are not printed, on one node or two."""
    noises = ("built successfully", "Gradient accumulation steps mismatch",
              "is deprecated. Please use")
    for name in ("one-node", "node-0", "node-1"):
        output = runs[name][1]
        assert "Saved the fine-tuned model" in output or name == "node-1"  # a whole run's output
        for noise in noises:
            assert noise not in output, f"{name}: {noise!r} is printed"


def test_killed_two_node_run_resumes_from_shared_checkpoints(runs, tmp_path, tiny_model):
    """Both nodes' checkpoints/ on one shared disk (NFS on real machines): every process's ZeRO-3
    shards and process 0's trainer_state.json go to one checkpoint-N/, so the same two commands,
    run again, resume it."""
    one_node = runs["one-node"][0]
    shared = {**settings_for(tmp_path, tiny_model, runs["dataset"], **RUN),
              "CHECKPOINTS": {"every_steps": 3, "keep": 1}}
    with pytest.raises(AssertionError, match="node 0 failed"):
        run_two_nodes([{**shared, "KILL": {"after_step": 5}}] * 2)  # SIGKILL on both: a power cut
    assert not (tmp_path / "out").exists()
    outputs = run_two_nodes([shared] * 2)
    assert f"Resuming from {tmp_path / 'checkpoints' / 'checkpoint-3'}" in outputs[0]
    assert losses(tmp_path / "out") == pytest.approx(losses(one_node / "out"), abs=TOLERANCE)
    assert largest_gap(tmp_path / "out", one_node / "out") <= TOLERANCE
    assert not (tmp_path / "checkpoints").exists()


def test_checkpoints_on_disks_of_their_own_stop_before_loading(dataset, tmp_path, tiny_model):
    """Each node's checkpoint_dir on its own disk, checkpoints on: node 1 would keep its ZeRO-3 parts of
    every checkpoint (only process 0 completes, rotates and removes them) and a rerun could not resume.
    Both nodes stop before the model loads, with one sentence that names the folder and the fix."""
    nodes = [tmp_path / f"node-{rank}" for rank in (0, 1)]
    for folder in nodes:
        folder.mkdir()
    outputs = run_two_nodes([settings_for(folder, tiny_model, dataset, **RUN) for folder in nodes],
                            expect_failure=True)
    for folder, output in zip(nodes, outputs):
        start = f"finetune.py: {folder / 'checkpoints'}/ is not one folder shared by all 2 machines ("
        assert start in output, output[-3000:]
        sentence = output[output.index(start):].splitlines()[0]
        assert "(node 1) cannot see a file that " in sentence
        assert "put checkpoint_dir on a disk all machines share (e.g. NFS)" in sentence
        assert sentence.endswith("or set CHECKPOINTS['every_steps'] = None (no checkpoints; a killed run starts over).")
        assert "Batch plan" not in output and "Traceback" not in output  # before the model loads
        assert list((folder / "checkpoints").glob(".shared-*")) == []  # the probe file is gone


def test_processes_end_together_without_the_interpreters_teardown(tmp_path):
    """failures.leave_together(), as finetune.main() ends: every process passes the barrier, closes the
    process group and ends with exit code 0, its output flushed, before Python's teardown (where the
    collective library's threads can abort the process) and before anything after it."""
    script = tmp_path / "leave.py"
    script.write_text(
        "import atexit, os, torch, torch.distributed as distributed\n"
        "import failures\n"
        "distributed.init_process_group('gloo')\n"
        "total = torch.ones(4)\n"
        "distributed.all_reduce(total)\n"
        "atexit.register(print, 'teardown ran')\n"
        "print(f\"rank {os.environ['RANK']} summed {total[0].item():g}\", end='')  # no newline: flushed?\n"
        "failures.leave_together()\n"
        "print('after leave_together')\n")
    port = str(free_port())
    processes = [subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONPATH=str(REPO), RANK=str(rank), WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for rank in (0, 1)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    for rank, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, output
        assert output.endswith(f"rank {rank} summed 2")
        assert "after leave_together" not in output and "teardown ran" not in output
