"""`python infer_test.py [MODEL_FOLDER]`: the one optional argument, and what anything else prints.

The model folder is the tiny GPT-J as tiny_gptj.build saves it (config, tokenizer and
model.safetensors: the files finetune.py writes to out/), so no training is needed here.
"""

import os
import subprocess
import sys

import pytest

import infer_test
from conftest import REPO

REFUSED = "infer_test.py takes one model folder or nothing, not '{}'; " + infer_test.USAGE


def run_infer_test(arguments, cwd):
    """The real command line, in a folder without out/: an ignored folder argument would fail."""
    result = subprocess.run([sys.executable, str(REPO / "infer_test.py"), *arguments], cwd=cwd,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    return result.returncode, result.stdout + result.stderr


def test_model_folder_argument_replaces_the_setting(tiny_model, tmp_path):
    code, output = run_infer_test([tiny_model], cwd=tmp_path)
    assert code == 0, output[-3000:]
    assert f"===== fine-tuned: {tiny_model} =====" in output
    for prompt in infer_test.SETTINGS["prompts"]:
        assert f"--- prompt: {prompt!r}\n{prompt}" in output
    assert "'out'" not in output


def test_no_argument_uses_the_setting(tmp_path):
    code, output = run_infer_test([], cwd=tmp_path)
    assert code == 1
    assert output.strip() == ("infer_test.py: the model folder 'out' does not exist. Run `deepspeed "
                              "finetune.py` to write it, or name a saved model's folder: `python "
                              "infer_test.py FOLDER`.")


@pytest.mark.parametrize("arguments", [["demo/work/out", "more"], ["--model_dir", "out"],
                                       ["--local_rank=0"], ["-x"]])
def test_anything_else_is_refused_with_the_usage(arguments, capsys):
    with pytest.raises(SystemExit) as stopped:
        infer_test.main(arguments)
    assert str(stopped.value) == REFUSED.format(" ".join(arguments))
    assert str(stopped.value).endswith(
        "usage: python infer_test.py [MODEL_FOLDER] (a folder finetune.py wrote; default: "
        "SETTINGS['model_dir']; the other settings are in SETTINGS at the top of infer_test.py)")
    assert "=====" not in capsys.readouterr().out  # refused before any model is loaded


def test_help_prints_the_usage_and_the_command_line_refuses_the_rest(tmp_path):
    code, output = run_infer_test(["--help"], cwd=tmp_path)
    assert code == 0 and output.strip() == infer_test.USAGE
    code, output = run_infer_test(["demo/work/out", "--seed", "1"], cwd=tmp_path)
    assert code == 1 and output.strip() == REFUSED.format("demo/work/out --seed 1")


def test_a_missing_or_incomplete_folder_argument_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(SystemExit, match=f"the model folder '{missing}' does not exist"):
        infer_test.main([missing])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"half' is incomplete \(no tokenizer_config.json, "
                                         r"model.safetensors\)"):
        infer_test.main([str(tmp_path / "half")])
