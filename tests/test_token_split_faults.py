"""token_split.py when the input or the machine is not as it should be: linked folders, bad files, a
dataset folder that cannot be written, Ctrl-C, kill -9, no network, a full disk. Each ends in one
sentence that names the file or setting, and leaves the old dataset byte for byte as it was.

The tests run as root here, which ignores permission bits: where those matter, token_split runs in a
child process without root's CAP_DAC_OVERRIDE (setpriv), which makes it obey them like any user."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import artifacts
import corpus
import token_split
from conftest import REPO, write_files
from test_token_split import PARAGRAPH

GOOD = {"a.txt": PARAGRAPH * 10, "b.txt": PARAGRAPH * 12}
NO_TOKENIZER = "/nonexistent/tokenizer"  # fails when loaded: a check that comes first came before


@pytest.fixture
def run_split(tmp_path, tiny_model, configure):
    """run_split(**settings): token_split.main() on tmp_path/text into tmp_path/dataset."""
    def run(**settings):
        configure(token_split.SETTINGS, text_dir=str(tmp_path / "text"),
                  dataset_dir=str(tmp_path / "dataset"), tokenizer=tiny_model, block_size=64,
                  validation_share=0.2, seed=1)
        configure(token_split.SETTINGS, **settings)
        token_split.main()
        return json.loads((tmp_path / "dataset" / artifacts.DATASET_FACTS).read_text())
    return run


@pytest.fixture
def old_dataset(tmp_path, run_split):
    """A complete dataset from an earlier run, and a check that it is still byte for byte the same
    with nothing beside it (but the names given)."""
    write_files(tmp_path / "text", GOOD)
    run_split()
    before = snapshot(tmp_path / "dataset")

    def unchanged(*beside):
        assert snapshot(tmp_path / "dataset") == before
        names = sorted(path.name for path in tmp_path.iterdir())
        assert names == sorted(["dataset", "text", *beside])
    return unchanged


def snapshot(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# token_split.main() in a child process. Arguments: the repo, SETTINGS, corpus.WORK, and where to
# send it a signal ("samples:SIGKILL": as the first samples are written; "facts:...": at the facts
# file).
CHILD = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import token_split, artifacts, corpus
from datasets.arrow_writer import ArrowWriter
token_split.SETTINGS.update(json.loads(sys.argv[2]))
corpus.WORK.update(json.loads(sys.argv[3]))
if sys.argv[4]:
    stage, name = sys.argv[4].split(":")
    places = {"samples": (ArrowWriter, "write_table"), "facts": (artifacts, "write_dataset_facts")}
    owner, attribute = places[stage]
    original = getattr(owner, attribute)
    def stop(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, name))
        return original(*args, **kwargs)
    setattr(owner, attribute, stop)
token_split.main()
"""


@pytest.fixture
def child(tmp_path, tiny_model):
    """child(stop="", drop_root=False, env=None, work=None, wait=True, **settings): token_split in a
    process of its own, on tmp_path/text into tmp_path/dataset; its result (or the process)."""
    def start(stop="", drop_root=False, env=None, work=None, wait=True, **settings):
        settings = {"text_dir": str(tmp_path / "text"), "dataset_dir": str(tmp_path / "dataset"),
                    "tokenizer": tiny_model, "block_size": 64, "validation_share": 0.2, "seed": 1,
                    **settings}
        command = [sys.executable, "-c", CHILD, str(REPO), json.dumps(settings),
                   json.dumps(work or {}), stop]
        if drop_root:  # root without the capabilities that let it ignore permission bits
            drop = "-dac_override,-dac_read_search,-fowner"
            command = ["setpriv", "--bounding-set", drop, *command]
        environment = {**os.environ, **(env or {})}
        # Ctrl-C as a terminal delivers it, even where these tests run as a background job (which
        # starts with SIGINT ignored, and Python then keeps it ignored).
        default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        if not wait:
            return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
        return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300,
                              preexec_fn=default_sigint)
    return start


def needs_setpriv():
    probe = subprocess.run(["setpriv", "--bounding-set", "-dac_override", "true"],
                           stderr=subprocess.DEVNULL)
    if probe.returncode != 0:
        pytest.skip("setpriv cannot drop root's capabilities: permission bits cannot be tested")


def last_line(result):
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


# --- The text folder ------------------------------------------------------------------------------

def test_linked_folders_are_followed_and_each_real_file_read_once(tmp_path, run_split, capsys):
    write_files(tmp_path / "elsewhere", {"c.txt": PARAGRAPH * 7, "deeper/d.txt": PARAGRAPH * 8})
    write_files(tmp_path / "text", GOOD)
    (tmp_path / "text" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "text" / "again").symlink_to(tmp_path / "elsewhere")  # the same folder twice
    (tmp_path / "text" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")  # a broken link
    facts = run_split()
    assert [entry["path"] for entry in facts["files"]] == [
        "a.txt", "again/c.txt", "again/deeper/d.txt", "b.txt"]  # linked/ holds the same real files
    output = capsys.readouterr()
    text = tmp_path / "text"
    assert (f"skipping '{text}/gone.txt': it is a link to '{tmp_path}/nowhere.txt', which does not "
            f"exist") in output.err
    assert "Read 4 files from" in output.out and "again/deeper/d.txt" in output.out
    assert f"followed the link '{text}/linked' -> '{tmp_path}/elsewhere'" in output.out
    assert (f"2 file(s) reached through two paths, read once: '{text}/linked/c.txt' is "
            f"'{text}/again/c.txt'") in output.out
    assert "skipped the broken link" in output.out


def link_back_to_the_text_folder(text):
    (text / "sub").mkdir()
    (text / "sub" / "back").symlink_to(text)


def links_to_each_other(text):
    (text / "x.txt").symlink_to(text / "y.txt")
    (text / "y.txt").symlink_to(text / "x.txt")


@pytest.mark.parametrize("make_loop, message", [
    (link_back_to_the_text_folder,
     "sub/back' links to '{text}', a folder it is itself in, so its files would be read forever"),
    (links_to_each_other,
     "x.txt' is a link that loops (through links back to itself) and never reaches a file"),
])
def test_link_loops_are_refused_by_name(tmp_path, run_split, old_dataset, make_loop, message):
    make_loop(tmp_path / "text")
    with pytest.raises(SystemExit) as failure:
        run_split()
    assert message.format(text=tmp_path / "text") in str(failure.value)
    old_dataset()


def test_text_folder_that_is_a_file(tmp_path, run_split):
    (tmp_path / "text").write_text("a file, not a folder")
    with pytest.raises(SystemExit, match="the text folder '.*/text' is a file, not a folder"):
        run_split()
    assert not (tmp_path / "dataset").exists()


def test_utf8_error_offset_counts_the_byte_order_mark_and_earlier_reads(run_split, tmp_path,
                                                                        old_dataset, configure):
    write_files(tmp_path / "text", {"bom.txt": b"\xef\xbb\xbfcaf\xe9 au lait"})
    with pytest.raises(SystemExit, match=r"bom.txt' is not valid UTF-8 \(byte offset 6: b'\\xe9 a"):
        run_split()
    old_dataset()
    (tmp_path / "text" / "bom.txt").unlink()
    # Reads of 7 bytes: the first ends inside the é, and the bad byte follows it in the second.
    write_files(tmp_path / "text", {"later.txt": "\ufeffabcé".encode() + b"\xff tail"})
    configure(corpus.WORK, read_bytes=7)
    with pytest.raises(SystemExit, match=r"later.txt' is not valid UTF-8 \(byte offset 8: b'\\xff"):
        run_split()
    old_dataset()


@pytest.mark.parametrize("content, encoding", [
    ("Dear Anna,\nthe lamp is lit.\n".encode("utf-16"), "UTF-16"),  # with a byte-order mark
    ("Dear Anna,\nthe lamp is lit.\n".encode("utf-16-le"), "UTF-16LE"),
    ("Dear Anna,\nthe lamp is lit.\n".encode("utf-16-be"), "UTF-16BE"),
])
def test_utf16_file_is_named_with_the_command_that_converts_it(tmp_path, run_split, old_dataset,
                                                               content, encoding):
    write_files(tmp_path / "text", {"windows.txt": content})
    with pytest.raises(SystemExit) as failure:
        run_split()
    path = tmp_path / "text" / "windows.txt"
    assert f"'{path}' looks like {encoding} text" in str(failure.value)
    command = f"iconv -f {encoding} -t UTF-8 '{path}' > converted.txt"
    assert f"`{command}`" in str(failure.value)
    old_dataset()
    if shutil.which("iconv"):  # the command given does convert it
        subprocess.run(command, shell=True, cwd=tmp_path, check=True)
        assert (tmp_path / "converted.txt").read_text() == "Dear Anna,\nthe lamp is lit.\n"


def test_unreadable_file_and_folder_are_named(tmp_path, child, old_dataset):
    needs_setpriv()
    text = tmp_path / "text"
    write_files(text, {"secret.txt": PARAGRAPH})
    (text / "secret.txt").chmod(0)
    result = child(drop_root=True)
    assert result.returncode == 1
    assert last_line(result) == (f"token_split.py: cannot read '{text}/secret.txt' (Permission "
                                 f"denied). Make it readable (`chmod a+r '{text}/secret.txt'`), or "
                                 f"move it out of {text}/.")
    old_dataset()
    (text / "secret.txt").unlink()
    write_files(text, {"closed/c.txt": PARAGRAPH})
    (text / "closed").chmod(0)
    try:
        result = child(drop_root=True)
    finally:
        (text / "closed").chmod(0o755)
    assert f"cannot look into the folder '{text}/closed' (Permission denied)" in last_line(result)
    old_dataset()


# --- The dataset folder: checked before the tokenizer is even loaded (NO_TOKENIZER) ---------------

def test_dataset_folder_that_is_a_file(tmp_path, run_split):
    write_files(tmp_path / "text", GOOD)
    (tmp_path / "dataset").write_text("my notes")
    with pytest.raises(SystemExit) as failure:
        run_split(tokenizer=NO_TOKENIZER)
    assert str(failure.value) == (
        f"token_split.py: SETTINGS['dataset_dir'] is '{tmp_path}/dataset', which is a file, not a "
        f"folder. Move that file away, or set SETTINGS['dataset_dir'] in token_split.py to another "
        f"folder.")
    assert (tmp_path / "dataset").read_text() == "my notes"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset", "text"]


def test_dataset_folder_under_a_read_only_parent(tmp_path, run_split):
    write_files(tmp_path / "text", GOOD)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(read_only)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(SystemExit) as failure:
            run_split(dataset_dir=str(read_only / "data" / "tokenized"), tokenizer=NO_TOKENIZER)
    finally:
        subprocess.run(["umount", "-l", str(read_only)])
    assert str(failure.value) == (
        f"token_split.py: SETTINGS['dataset_dir'] is '{read_only}/data/tokenized', but nothing can "
        f"be written in '{read_only}' (Read-only file system). Make that folder writable, or set "
        f"SETTINGS['dataset_dir'] in token_split.py to a folder you can write to.")


@pytest.mark.parametrize("protect", ["dataset/train/state.json", "dataset.old/leftover"])
def test_dataset_that_cannot_be_deleted_is_refused_before_tokenizing(tmp_path, run_split,
                                                                     old_dataset, protect):
    if protect.startswith("dataset.old"):  # an earlier copy left beside the dataset
        write_files(tmp_path, {protect: "left by an earlier run"})
    protected = tmp_path / protect
    if subprocess.run(["chattr", "+i", str(protected)], capture_output=True).returncode != 0:
        pytest.skip("this file system has no immutable flag (chattr +i)")
    try:
        with pytest.raises(SystemExit) as failure:
            run_split(tokenizer=NO_TOKENIZER)
    finally:
        subprocess.run(["chattr", "-i", str(protected)])
    folder = protect.split("/")[0]
    assert str(failure.value) == (
        f"token_split.py: SETTINGS['dataset_dir'] is '{tmp_path}/dataset', but its earlier copy "
        f"'{tmp_path}/{folder}' cannot be replaced: '{protected}' cannot be deleted (a read-only "
        f"file system, a protected file, or another user's). Remove it by hand, or set "
        f"SETTINGS['dataset_dir'] in token_split.py to another folder.")
    old_dataset(*(["dataset.old"] if folder == "dataset.old" else []))


def test_read_only_old_dataset_is_replaced_and_leaves_nothing_behind(tmp_path, child, old_dataset):
    needs_setpriv()
    for round_ in range(2):  # the second run used to fail on the tokenized.old that the first left
        subprocess.run(["chmod", "-R", "a-w", str(tmp_path / "dataset")], check=True)
        (tmp_path / "text" / f"new{round_}.txt").write_text(PARAGRAPH * 5)
        result = child(drop_root=True)
        assert result.returncode == 0, result.stderr
        assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset", "text"]
        files = json.loads((tmp_path / "dataset" / artifacts.DATASET_FACTS).read_text())["files"]
        assert f"new{round_}.txt" in [entry["path"] for entry in files]


def test_run_killed_between_the_renames_gets_the_old_dataset_back(tmp_path, run_split, old_dataset):
    os.replace(tmp_path / "dataset", tmp_path / "dataset.old")  # as a kill between the renames can
    with pytest.raises(SystemExit, match="cannot load the tokenizer"):
        run_split(tokenizer=NO_TOKENIZER)
    old_dataset()


# --- Interrupted: Ctrl-C and kill -9 -------------------------------------------------------------

@pytest.mark.parametrize("stage", ["samples", "facts"])
def test_kill_during_the_save_leaves_the_old_dataset_byte_for_byte(tmp_path, child, old_dataset,
                                                                   stage):
    """Fails if the dataset is written over the old one: the kill lands while samples are written,
    or after they are, before the facts file."""
    (tmp_path / "text" / "c.txt").write_text(PARAGRAPH * 9)
    result = child(stop=f"{stage}:SIGKILL")
    assert result.returncode == -signal.SIGKILL
    old_dataset("dataset.partial")  # all a kill -9 can leave: the half-written folder beside it
    assert child().returncode == 0  # the next run clears it away
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dataset", "text"]
    facts = json.loads((tmp_path / "dataset" / artifacts.DATASET_FACTS).read_text())
    assert len(facts["files"]) == 3


def test_ctrl_c_during_the_save_is_one_sentence_and_leaves_nothing(tmp_path, child, old_dataset):
    (tmp_path / "text" / "c.txt").write_text(PARAGRAPH * 9)
    result = child(stop="samples:SIGINT")
    assert result.returncode == 1
    message = f"token_split.py: stopped by Ctrl-C; '{tmp_path}/dataset' is as it was."
    assert last_line(result) == message
    old_dataset()


def test_ctrl_c_while_tokenizing(tmp_path, child, old_dataset):
    write_files(tmp_path / "text", {f"long{number}.txt": f"Entry {number}. " + PARAGRAPH * 8000
                                    for number in range(4)})  # 2 MB: seconds of tokenizing
    running = child(wait=False, work={"batch_chars": 4096})
    tokens = tmp_path / "dataset.partial" / token_split.TOKENS_FILE
    while not (tokens.exists() and tokens.stat().st_size) and running.poll() is None:
        time.sleep(0.01)
    running.send_signal(signal.SIGINT)
    _, stderr = running.communicate(timeout=60)
    assert running.returncode == 1, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == f"token_split.py: stopped by Ctrl-C; '{tmp_path}/dataset' is as it was."
    old_dataset()


# --- The tokenizer and the disk -------------------------------------------------------------------

def test_tokenizer_without_network_is_one_sentence(tmp_path, child, old_dataset):
    empty_cache = tmp_path.parent / f"{tmp_path.name}-hf-home"  # nothing cached: a new machine
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(empty_cache)}
    result = child(tokenizer="EleutherAI/gpt-j-6B", env=offline)
    assert result.returncode == 1
    line = last_line(result)
    assert line.startswith("token_split.py: cannot load the tokenizer 'EleutherAI/gpt-j-6B' (We "
                           "couldn't connect")
    assert "comes from the Hugging Face hub" in line and "or from a local folder" in line
    assert "set SETTINGS['tokenizer'] in token_split.py to that folder" in line
    old_dataset()


def test_tokenizer_folder_that_does_not_exist(tmp_path, run_split, old_dataset):
    with pytest.raises(SystemExit, match=r"tokenizer '/nonexistent/tokenizer' \(no such folder"):
        run_split(tokenizer=NO_TOKENIZER)
    old_dataset()


@pytest.mark.disk_size("512k")
def test_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, small_disk, run_split):
    write_files(tmp_path / "text", {f"t{number}.txt": f"Entry {number}. " + PARAGRAPH * 1500
                                    for number in range(6)})  # 1 MB of samples
    with pytest.raises(SystemExit) as failure:
        run_split(dataset_dir=str(small_disk / "dataset"))
    assert str(failure.value) == (
        f"token_split.py: the disk holding '{small_disk}/dataset' is full (No space left on "
        f"device); '{small_disk}/dataset' is as it was. Free some space, or set "
        f"SETTINGS['dataset_dir'] to a folder on a larger disk.")
    assert list(small_disk.iterdir()) == []
