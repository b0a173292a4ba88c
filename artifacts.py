"""The folders the scripts hand each other: the dataset and its facts, out/ and its log, whole.

token_split.py writes data/tokenized/ (its samples stream in through samples_written) with a facts
file; finetune.py reads and checks those facts before it loads anything, and writes out/ with
finetune_log.json. Both write beside the final folder (".partial") and swap it in with renames,
so a folder that exists is always complete.
"""

import array
import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import stat
import sys
from pathlib import Path

DATASET_FACTS = "token_split.json"  # written last into the dataset folder: it marks it complete
TRAINING_LOG = "finetune_log.json"  # in out/: validation loss before and after, the Trainer's log
PROBE_TEXT = "Hello world, naïve café 123\n"


def partial_path(target):
    """Where a folder is written before it replaces target."""
    return Path(str(Path(target)) + ".partial")


def old_path(target):
    """Where the folder that target replaces waits, between the two renames, to be deleted."""
    return Path(str(Path(target)) + ".old")


@contextlib.contextmanager
def written_whole(target, script, setting):
    """A fresh, empty folder beside target to write into, swapped in for target if the block ends.

    Checked before the long work: target can be replaced and its folder written (an error names
    `setting`, the script's setting for target). If the block fails or is interrupted, the folder is
    removed again and target stays as it was. A full disk is said in a sentence."""
    partial = start_partial(target, script, setting)
    try:
        yield partial
        swap_in(partial, target)
    except BaseException as error:
        with contextlib.suppress(OSError):
            remove_folder(partial)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SystemExit(f"{script}: the disk holding '{target}' is full ({error.strerror}); "
                             f"'{target}' is as it was. Free some space, or set {setting} to a "
                             f"folder on a larger disk.") from None
        raise


def start_partial(target, script, setting):
    """Make an empty `<target>.partial`, once target is known to be a folder this process can
    replace."""
    check_replaceable(target, script, setting)
    target, partial, old = Path(target), partial_path(target), old_path(target)
    try:
        remove_folder(old)  # left by a run that could not delete it
        remove_folder(partial)  # left by a run that was killed while writing
        partial.mkdir(parents=True)
    except OSError as error:
        unwritable(target, script, setting, error.strerror)
    return partial


def check_replaceable(target, script, setting):
    """Stop with the fix unless target can be replaced whole by a folder written beside it: run
    before the long work (token_split.py's tokenizing, finetune.py's training)."""
    target, old = Path(target), old_path(target)
    where = f"{setting} is '{target}'"
    if target.exists() and not target.is_dir():
        raise SystemExit(f"{script}: {where}, which is a file, not a folder. Move that file away, "
                         f"or set {setting} in {script} to another folder.")
    if target.is_dir() and os.path.ismount(target):
        raise SystemExit(f"{script}: {where}, which is a mount point, but it is replaced whole, by "
                         f"renames. Set {setting} in {script} to a folder inside it.")
    if old.exists() and not target.exists():
        os.replace(old, target)  # a run was killed between swap_in's renames: the old one goes back
    for folder in (target, old):
        blocker = undeletable(folder)
        if blocker:
            raise SystemExit(f"{script}: {where}, but its earlier copy '{folder}' cannot be "
                             f"replaced: '{blocker}' cannot be deleted (a read-only file system, a "
                             f"protected file, or another user's). Remove it by hand, or set "
                             f"{setting} in {script} to another folder.")
    parent = existing_parent(partial_path(target))
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = os.statvfs(parent).f_flag & os.ST_RDONLY
        unwritable(target, script, setting,
                   "Read-only file system" if read_only else "Permission denied")


def unwritable(target, script, setting, reason):
    parent = existing_parent(partial_path(target))
    raise SystemExit(f"{script}: {setting} is '{target}', but nothing can be written in '{parent}' "
                     f"({reason}). Make that folder writable, or set {setting} in {script} to a "
                     f"folder you can write to.")


def existing_parent(path):
    return next(folder for folder in Path(path).parents if folder.exists())


def undeletable(folder):
    """The first folder or file under folder that this process cannot delete, or None: a folder that
    is neither writable nor this process's to make writable (another user's, or on a read-only file
    system), or anything with an immutable or append-only flag (`chattr +i`), which stops even
    root."""
    if not os.path.isdir(folder) or os.path.islink(folder):
        return None
    for directory, _, names in os.walk(folder):
        read_only_disk = os.statvfs(directory).f_flag & os.ST_RDONLY
        owned = os.stat(directory).st_uid == os.geteuid()
        writable = os.access(directory, os.W_OK | os.X_OK) or (owned and not read_only_disk)
        if not writable or protected(directory):
            return directory
        for path in (os.path.join(directory, name) for name in names):
            if protected(path):
                return path
    return None


def protected(path):
    """Whether path has the immutable or append-only flag (read with the ioctl that lsattr uses)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:  # a link, or not ours to read: its folder decides
        return False
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(descriptor, 0x80086601, flags)  # FS_IOC_GETFLAGS
        return bool(flags[0] & (0x10 | 0x20))  # FS_IMMUTABLE_FL, FS_APPEND_FL
    except OSError:  # a file system without these flags
        return False
    finally:
        os.close(descriptor)


def remove_folder(folder):
    """Delete folder and all it holds, also when it was made read-only (its owner may undo that)."""
    if os.path.islink(folder) or os.path.isfile(folder):
        os.unlink(folder)
    if not os.path.isdir(folder):
        return
    make_owner_writable(folder)
    for directory, subfolders, _ in os.walk(folder):  # top-down: a folder is listed after its chmod
        for name in subfolders:
            make_owner_writable(os.path.join(directory, name))
    shutil.rmtree(folder)


def make_owner_writable(folder):
    if not os.path.islink(folder):  # a link's chmod would change what it points at
        with contextlib.suppress(OSError):
            os.chmod(folder, os.stat(folder).st_mode | stat.S_IRWXU)


def swap_in(partial, target):
    """Put a completely written folder in place of target with renames (atomic on one disk): at
    every moment target is either the old complete folder or the new one, and the old one is then
    deleted (also when it was made read-only, which used to leave it in the way of the next run)."""
    partial, target, old = Path(partial), Path(target), old_path(target)
    readable_as_umask_allows(partial)
    remove_folder(old)
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(partial, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    try:
        remove_folder(old)
    except OSError as error:  # the new folder is in place; the next run names what keeps the old
        print(f"warning: could not delete the earlier copy '{old}' ({error.strerror}); delete it "
              f"by hand.", file=sys.stderr)


def readable_as_umask_allows(folder):
    """Files as readable as the user's other files: the safetensors weights come out 0600 (written
    to a private temporary file first), so others on a shared machine could not load out/."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(path.stat().st_mode | (0o644 & ~umask))


def tokenizer_fingerprint(tokenizer):
    """Size, EOS and a short text's ids: two tokenizers that agree on these are taken to be the
    same."""
    return {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_probe": tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"],
    }


def token_dtype(vocab_size):
    """The smallest type that holds every token id: GPT-J's 50,400 fit in 2 bytes (uint16)."""
    import numpy as np

    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def sample_features(block_size, dtype):
    """The columns of a sample: ids in the smallest type that holds the vocabulary (uint16 for
    GPT-J), labels in int32 for their -100, the mask in int8. 7 bytes a token on disk where the
    dataset used to take 13 (int32 ids, int64 labels). The Trainer's default_data_collator gets
    Python ints from them and stacks them into int64 tensors, as before."""
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value(dtype.__name__), length=block_size),
        "attention_mask": List(Value("int8"), length=block_size),
        "labels": List(Value("int32"), length=block_size),
    })


@contextlib.contextmanager
def samples_written(folder, block_size, dtype):
    """(write, counts): write(split, columns) streams samples into folder's train or validation
    split as they come (columns: a rows x block_size numpy array per column), for datasets'
    load_from_disk; counts has each split's samples, real tokens and padding tokens.

    Not datasets' public way, Dataset.from_generator and then save_to_disk (whose memory-mapped
    copy counts against RAM): for the 150k samples (2.1 GB) of a 1 GB corpus it took 2.24 GiB of
    RAM and 145 s, where this takes 0.17 GiB and 8 s (`python bench/token_bench.py writers`); the
    bounds are 2 GiB, and 1.2x the tokenizer alone (~200 s). So datasets lays out the folder for an
    empty dataset with these columns, naming each split's one data file in its state.json, and the
    samples go there."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    features = sample_features(block_size, dtype)
    empty = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # its bar would count the empty dataset's no samples
    try:
        datasets.DatasetDict(train=empty, validation=empty).save_to_disk(
            str(folder), num_shards={"train": 1, "validation": 1})
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    writers, counts = {}, {}
    for split in ("train", "validation"):
        counts[split] = {"samples": 0, "tokens": 0, "padding_tokens": 0}
        [data_file] = json.loads((Path(folder) / split / "state.json").read_text())["_data_files"]
        path = Path(folder) / split / data_file["filename"]
        writers[split] = ArrowWriter(features=features, path=str(path))

    # Samples are held until they make ~1M tokens, then written as one Arrow record batch: the
    # read-back below touches every batch's pages, so 60-sample batches (one a document) took 0.31
    # GiB of RAM for 150k samples, 512-sample batches 0.17 GiB.
    held, batch_samples = {"train": [], "validation": []}, max(1, 2 ** 20 // block_size)

    def write(split, columns):
        rows = len(columns["input_ids"])
        if rows:
            held[split].append(pa.table({
                name: pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), block_size)
                for name, values in columns.items()}))
            tokens = int(columns["attention_mask"].sum())  # the mask is 1 on real tokens
            counts[split]["samples"] += rows
            counts[split]["tokens"] += tokens
            counts[split]["padding_tokens"] += rows * block_size - tokens
            if sum(table.num_rows for table in held[split]) >= batch_samples:
                flush(split)

    def flush(split):
        if held[split]:
            writers[split].write_table(pa.concat_tables(held[split]).combine_chunks())
            held[split] = []

    yield write, counts
    for split, writer in writers.items():
        flush(split)
        writer.finalize()
        writer.close()
    saved = datasets.load_from_disk(str(folder))
    for split, count in counts.items():  # the layout is datasets': should a version change it, stop
        assert len(saved[split]) == count["samples"], f"{folder}/{split}: read back other samples"


def write_dataset_facts(folder, facts):
    (Path(folder) / DATASET_FACTS).write_text(json.dumps(facts, indent=1) + "\n")


def read_dataset_facts(dataset_dir):
    """The facts token_split.py saved; a clear error if the folder is missing or was never
    completed."""
    path = Path(dataset_dir) / DATASET_FACTS
    if not path.is_file():
        state = "does not exist"
        if Path(dataset_dir).exists():
            state = "is incomplete (an earlier token_split.py run stopped half-way)"
        raise SystemExit(f"finetune.py: the dataset folder '{dataset_dir}' {state}. Run "
                         f"`python token_split.py` first.")
    return json.loads(path.read_text())


def check_dataset(facts, tokenizer, model_name, context):
    """Stop before loading the model if the dataset was made for another tokenizer or is too
    long."""
    fingerprint = {key: facts[key] for key in ("vocab_size", "eos_token_id", "tokenizer_probe")}
    if tokenizer_fingerprint(tokenizer) != fingerprint:
        raise SystemExit(
            f"finetune.py: the dataset was tokenized with '{facts['tokenizer']}' "
            f"({facts['vocab_size']} tokens), which is not the tokenizer of '{model_name}' "
            f"({len(tokenizer)} tokens). Set token_split.py's tokenizer to '{model_name}' and "
            f"re-run `python token_split.py`.")
    if facts["block_size"] > context:
        raise SystemExit(f"finetune.py: the dataset's blocks of {facts['block_size']} tokens are "
                         f"longer than the model's context of {context}. Lower token_split.py's "
                         f"block_size and re-run it.")


def validation_summary(log_history):
    """Validation loss and perplexity before and after training, from the Trainer's log."""
    losses = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    if len(losses) < 2:
        return {}
    return {"validation_loss_before": losses[0], "validation_loss_after": losses[-1],
            "validation_perplexity_before": math.exp(losses[0]),
            "validation_perplexity_after": math.exp(losses[-1])}


def write_training_log(folder, log_history, facts, **extra):
    """out/finetune_log.json: what was trained on, the validation summary and the Trainer's whole
    log. Returns the summary in a sentence."""
    summary = validation_summary(log_history)
    kept = ("tokenizer", "block_size", "tokens", "counts", "created")
    dataset = {key: facts[key] for key in kept}
    log = {**summary, **extra, "dataset": dataset, "log_history": log_history}
    (Path(folder) / TRAINING_LOG).write_text(json.dumps(log, indent=1) + "\n")
    if not summary:
        return "No validation loss was measured."
    return (f"Validation loss {summary['validation_loss_before']:.4f} -> "
            f"{summary['validation_loss_after']:.4f}, perplexity "
            f"{summary['validation_perplexity_before']:.2f} -> "
            f"{summary['validation_perplexity_after']:.2f}.")
