"""Shared fixtures: a tiny GPT-J with a locally trained tokenizer, and helpers to drive the real scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# The runs the tests start (~60 processes) cache the bytecode they compile: with PYTHONDONTWRITEBYTECODE
# set, each would compile torch, transformers and DeepSpeed from source again (~3 s each on 2 cores).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

import tiny_gptj  # noqa: E402
from failures import free_port  # noqa: E402,F401  (the product's own, for the launcher's port)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random GPT-J whose BPE tokenizer was trained on the demo corpus (built once per session)."""
    return tiny_gptj.build(REPO / "demo" / "text", str(tmp_path_factory.mktemp("tiny") / "tiny-gptj"))


@pytest.fixture
def configure(monkeypatch):
    """configure(module_dict, key=value, ...): change a script's settings for this test only."""
    def update(settings, **values):
        for key, value in values.items():
            monkeypatch.setitem(settings, key, value)
    return update


def write_files(root, files):
    """files: {relative path: str or bytes}. Strings are written as UTF-8 without newline translation."""
    for name, content in files.items():
        path = Path(root) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return root


def run_finetune(settings, gpus=1, timeout=600, expect_failure=False, launcher=False):
    """finetune.main() in processes of its own, with finetune.py's settings updated from `settings`
    ({"MODEL": {...}, "SETUP": "ram", ...}). Through the real launcher, `deepspeed --num_gpus N
    tests/run_finetune.py settings.json`, when gpus > 1 or launcher=True; else the one process that
    launcher would start, with the environment it would give it (RANK, WORLD_SIZE, MASTER_PORT...),
    without the launcher's own ~5 s of start-up (two more Pythons importing torch and DeepSpeed)."""
    settings_file = Path(settings["FILES"]["out_dir"] + ".settings.json")
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    settings_file.write_text(json.dumps(settings))
    environment = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    environment.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    port = str(free_port())
    if launcher or gpus > 1:
        command = ["deepspeed", "--num_gpus", str(gpus), "--master_port", port]
    else:  # the launcher would also pass --local_rank=0, which run_finetune.py does not read
        environment.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", CROSS_RANK="0",
                           CROSS_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        command = [sys.executable, "-u"]
    command += [str(REPO / "tests" / "run_finetune.py"), str(settings_file)]
    # A session of its own, like a terminal's foreground job: a Ctrl-C test signals this group, not pytest.
    result = subprocess.run(command, env=environment, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            start_new_session=True)
    leftovers = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))
    for buffer in leftovers:  # a killed run cannot remove its DeepSpeed CPU allreduce buffer (66 MB of RAM each)
        buffer.unlink(missing_ok=True)
    if not expect_failure and result.returncode == 0:
        assert not leftovers, f"finetune.py left {leftovers} in /dev/shm"
    if expect_failure:
        assert result.returncode != 0, "the run was expected to die"
    elif result.returncode != 0:
        raise AssertionError(f"finetune failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return result.stdout + result.stderr


@pytest.fixture
def small_disk(tmp_path, request):
    """A real small file system (tmpfs, 1 MiB unless the test's `disk_size` mark says): a full disk, for real."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    size = request.node.get_closest_marker("disk_size").args[0] if request.node.get_closest_marker("disk_size") else "1m"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)])


def pytest_configure(config):
    config.addinivalue_line("markers", "disk_size(size): size of the small_disk tmpfs, e.g. '32m'")
    config.addinivalue_line("markers", "async_io: needs DeepSpeed's async I/O op (compiled meanwhile)")


# DeepSpeed compiles its async I/O op on first use: minutes of a 2-core machine. When a selected test needs
# it, a low-priority process compiles it into the runs' cache while the other tests run; the test's own
# load() then waits on the build's lock. The lock is touched meanwhile, else a run would take it for stale.
# Low priority across sessions too: Linux shares the CPU between sessions (autogroups) before nice counts,
# and each run the tests start has a session of its own.
COMPILE_ASYNC_IO = """
import os, signal, sys, threading, time
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # ends the build through its finally: lock removed
try:
    Path("/proc/self/autogroup").write_text("19")
except OSError:
    pass
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("AsyncIOBuilder")
def keep_lock_fresh():
    while True:
        for lock in Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("**/async_io/lock"):
            lock.touch()
        time.sleep(30)
threading.Thread(target=keep_lock_fresh, daemon=True).start()
if builder.is_compatible():
    builder.load()
"""


def pytest_collection_modifyitems(config, items):
    if any(item.get_closest_marker("async_io") for item in items):
        environment = dict(os.environ, DS_ACCELERATOR="cpu")
        environment.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        config.async_io_build = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", COMPILE_ASYNC_IO],
                                                 env=environment, stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, start_new_session=True)


def pytest_unconfigure(config):
    build = getattr(config, "async_io_build", None)
    if build and build.poll() is None:  # the test was not reached (stopped early, or -x)
        build.terminate()
        build.wait()
