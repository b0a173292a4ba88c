"""`python demo.py`, the README's offline demo, run as a user would, in a copy of the repository."""

import os
import re
import shutil
import subprocess
import sys

from conftest import REPO


def test_demo_runs_the_trio_end_to_end(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns("venv", ".git", "work", "out", "data", "checkpoints",
                                                              "__pycache__", ".whl", "bench"))
    environment = dict(os.environ)
    environment.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    result = subprocess.run([sys.executable, "demo.py"], cwd=copy, env=environment, capture_output=True, text=True,
                            timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    before, after = map(float, re.search(r"Validation loss ([\d.]+) -> ([\d.]+)", output).groups())
    print(f"demo: validation loss {before} -> {after}")
    assert after < before - 0.3
    for prompt in ("12 March. Wind", "Dear Anna,", "Bread asks for"):
        assert f"--- prompt: '{prompt}'" in output
    assert re.search(r"Demo finished in \d+ s", output)
    # Everything went to demo/work/; nothing beside the user's own folders.
    assert (copy / "demo" / "work" / "out" / "model.safetensors").is_file()
    assert "python infer_test.py demo/work/out" in output
    assert "Its loss curves: demo/work/out/loss.png, and `tensorboard --logdir demo/work/out/tensorboard`" in output
    assert (copy / "demo" / "work" / "out" / "loss.png").is_file()
    assert list((copy / "demo" / "work" / "out" / "tensorboard").rglob("events.out.tfevents.*"))
    assert not (copy / "checkpoints").exists() and not (copy / "out").exists() and not (copy / "data").exists()
    # Calm: no progress bars (nested ones garbled the Trainer's), none of the launcher's own lines, no
    # Accelerate thread warning: 149 lines before, 78 after (the Trainer's logs one a line).
    for noise in ("it/s]", "[INFO]", "Unable to find hostfile", "OMP_NUM_THREADS", "Writing model shards"):
        assert noise not in output, noise
    assert len(output.splitlines()) <= 90
