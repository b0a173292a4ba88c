"""Lines a user reads as trouble: silenced where a library offers the means, and a failure's sentence
comes quickly and last (the launcher's own closing line aside), with the script's name."""

import inspect
import os
import subprocess
import sys
import warnings

import pytest
from huggingface_hub import constants

import failures
from conftest import REPO, free_port
from test_finetune import make_dataset


def test_a_hub_name_without_network_is_said_within_seconds(tmp_path, tiny_model, configure):
    """No network: huggingface_hub retried each file 5 times (~25 s, "Retrying in 8s [Retry 5/5]")
    before our sentence; one request that gets no answer now puts it offline first. The hub's name
    here never resolves (.invalid), as on a machine without network."""
    dataset_dir = make_dataset(tmp_path, tiny_model, configure)
    code = ("import sys, time, finetune\n"
            f"finetune.FILES['dataset_dir'] = {dataset_dir!r}\n"
            "finetune.MODEL.update(name='EleutherAI/gpt-j-6B')\n"
            "started = time.time()\n"
            "try:\n"
            "    finetune.main()\n"
            "finally:\n"
            "    print(f'took {time.time() - started:.1f} s', flush=True)\n")
    environment = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu",
                       HF_ENDPOINT="https://huggingface.invalid", HF_HOME=str(tmp_path / "empty-cache"))
    environment.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=environment)
    assert result.returncode == 1, result.stderr[-3000:]
    took = float(result.stdout.split("took ")[1].split(" s")[0])
    print(f"no network: our sentence after {took} s of finetune.main()")
    assert took <= 10
    assert "Retrying in" not in result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("finetune.py: cannot load the model 'EleutherAI/gpt-j-6B' (")
    assert last.endswith("set MODEL['name'] in finetune.py to that folder.")


def test_token_splits_tokenizer_without_network_is_said_within_seconds(tmp_path):
    """token_split.py loads the tokenizer through the same check: offline, its sentence within seconds."""
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("Some text to split. " * 50)
    code = ("import time, token_split\n"
            "token_split.SETTINGS.update(text_dir='text', dataset_dir='dataset', tokenizer='EleutherAI/gpt-j-6B')\n"
            "started = time.time()\n"
            "try:\n"
            "    token_split.main()\n"
            "finally:\n"
            "    print(f'took {time.time() - started:.1f} s', flush=True)\n")
    environment = dict(os.environ, PYTHONPATH=str(REPO), HF_ENDPOINT="https://huggingface.invalid",
                       HF_HOME=str(tmp_path / "empty-cache"))
    environment.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env=environment)
    assert result.returncode == 1, result.stderr[-3000:]
    assert float(result.stdout.split("took ")[1].split(" s")[0]) <= 10
    assert "Retrying in" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "token_split.py: cannot load the tokenizer 'EleutherAI/gpt-j-6B' (")


def test_the_model_sentence_names_the_script_that_loads(monkeypatch):
    """token_split.py loads its tokenizer through the same sentence, with its own name and setting."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline already: no request is made
    with pytest.raises(SystemExit) as stopped:
        with failures.model_within_reach("./no/such/folder", script="token_split.py", what="tokenizer",
                                         setting="SETTINGS['tokenizer']"):
            raise OSError("./no/such/folder is not a local folder and is not a valid model identifier")
    assert str(stopped.value) == (
        "token_split.py: cannot load the tokenizer './no/such/folder' (no such folder). It comes from the "
        "Hugging Face hub (downloaded once, which needs the network, then cached) or from a local folder: "
        "without network, copy the model's folder to this machine and set SETTINGS['tokenizer'] in "
        "token_split.py to that folder.")


def test_the_one_gpu_barrier_warning_is_silenced():
    """PyTorch warns at barrier() on one CUDA GPU (never on a CPU, so the warning is raised here by
    hand, with the text of the installed PyTorch)."""
    import torch.distributed.distributed_c10d as c10d

    text = "barrier(): using the device under current context. "
    assert text in inspect.getsource(c10d.barrier)
    with warnings.catch_warnings(record=True) as caught:
        failures.silence_false_alarms()
        warnings.warn(text + "You can specify `device_id` in `init_process_group` to mute this warning.",
                      UserWarning)
    assert caught == []


def test_a_failure_under_the_launcher_ends_with_our_sentence(tmp_path):
    """`deepspeed -q finetune.py` with no dataset: no hostfile notice and none of the launcher's INFO
    lines; after our sentence only the launcher's own "[ERROR] ... exits with return code = 1", which it
    prints whenever a process fails (deepspeed/launcher/launch.py, at every log level)."""
    environment = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    environment.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    result = subprocess.run(["deepspeed", "-q", "--num_gpus", "1", "--master_port", str(free_port()),
                             str(REPO / "finetune.py")], cwd=tmp_path, env=environment, text=True, timeout=300,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # in the order a terminal shows
    output = result.stdout
    assert result.returncode == 1
    assert "Unable to find hostfile" not in output and "[INFO]" not in output and "Traceback" not in output
    sentence = "finetune.py: the dataset folder 'data/tokenized' does not exist. Run `python token_split.py` first."
    after = output[output.index(sentence) + len(sentence):].strip().splitlines()
    assert len(after) == 1 and "[ERROR]" in after[0] and after[0].endswith("exits with return code = 1")
