"""CPU benchmark of token_split.py: wall time, MB/s and peak RAM, against the fast tokenizer alone.

    python bench/token_bench.py                  # every case in CASES: ~30 minutes on 2 cores
    python bench/token_bench.py 10MB 100MB       # only these cases
    python bench/token_bench.py writers          # artifacts.samples_written vs datasets' public way

Offline, and outside the repo: the corpora are cut from text found on this machine (Python
sources, /usr/share docs, ...) into BENCH["work_dir"], and a byte-level BPE of GPT-J's size is
trained there on part of that text (both are kept for the next run). Each measurement runs in a
child process of its own, whose peak RSS comes from os.wait4: token_split.py as it is; the old
token_split.py (BENCH["old_commit"], run from a copy of the repo at that commit) on the cases marked
old; and the fast tokenizer alone on the same corpus, read in the same pieces, in batches over both
cores with the tokenizer's own threads (and, where marked, with two processes of one thread, and
through transformers' tokenizer call). Results replace those of the same cases in
bench/token_results.json.
"""

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "token_results.json"

BENCH = {
    "work_dir": "/tmp/token_bench",  # corpora, tokenizer, datasets (~6 GB at the peak); kept
    "vocab_size": 50400,  # GPT-J's; its ids fit in uint16
    "block_size": 2048,  # token_split's default
    "tokenizer_training_bytes": 40_000_000,  # text the BPE learns its merges from (~15 s)
    "old_commit": "f9ed989",  # token_split.py before it worked in pieces: the "before" of the table
    "quiet_cpu_share": 0.2,  # wait (up to 10 min) until other processes use less of the CPUs
}

# Where the text comes from: files with these endings below these folders, each distinct text once.
SOURCES = ["/usr/share", "/usr/lib", str(Path(sys.prefix) / "lib")]
EXTENSIONS = (".txt", ".md", ".rst", ".py", ".html", ".tex", ".c", ".h")

# name: corpus size in bytes, number of files; old: also run the old token_split; more: also the
# tokenizer with two processes and through transformers' call; nice: run niced (the 1 GB cases).
CASES = {
    "10MB": dict(bytes=10 ** 7, files=33, old=True, more=True),
    "100MB": dict(bytes=10 ** 8, files=250, old=True, more=True),
    "100MB-one-file": dict(bytes=10 ** 8, files=1),
    "1GB": dict(bytes=10 ** 9, files=2500, nice=10),
    "1GB-one-file": dict(bytes=10 ** 9, files=1, nice=10),
}

# "writers": a 1 GB corpus's samples (synthetic ids), written by artifacts.samples_written and by
# datasets' public way, Dataset.from_generator then save_to_disk: its peak RSS and time.
WRITERS = {"samples": 149_533, "ways": ["samples_written", "from_generator"]}

GIB = 2 ** 30


def main():
    if sys.argv[1:] == ["writers"]:
        record = {"date": datetime.date.today().isoformat(), "commit": measured_commit(),
                  "command": "python bench/token_bench.py writers", **WRITERS}
        record.update((way, writer_run(way)) for way in WRITERS["ways"])
        save("writers", record)
        print(json.dumps(record, indent=1), flush=True)
        return
    names = sys.argv[1:] or list(CASES)
    unknown = [name for name in names if name not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; the cases are {list(CASES)}")
    work = Path(BENCH["work_dir"])
    pool = text_pool(work)
    tokenizer = work / f"tokenizer-{BENCH['vocab_size']}"
    if not (tokenizer / "tokenizer.json").exists():
        in_child("train_tokenizer", pool, tokenizer)
    old_repo = old_checkout(work)
    for name in names:
        record = run_case(name, CASES[name], work, pool, tokenizer, old_repo)
        save(name, record)
        print(summary_line(name, record), flush=True)


# A child's peak RSS (os.wait4) starts from its parent's own peak, which it inherits at the fork:
# the work that needs memory (training the tokenizer, comparing datasets) runs in children too, and
# rss_floor_gib (measured for `true`) says what every figure includes.
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import token_bench
print(json.dumps(getattr(token_bench, sys.argv[2])(*sys.argv[3:])))
"""


def in_child(function, *arguments):
    """token_bench.function(*arguments) in a child process; what it returns (through JSON)."""
    command = [sys.executable, "-c", CHILD, str(REPO / "bench"), function, *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def text_pool(work, size=600_000_000):
    """One file of distinct UTF-8 texts found on this machine (up to `size` bytes), built once."""
    pool = work / "pool.txt"
    if pool.exists():
        return pool
    work.mkdir(parents=True, exist_ok=True)
    seen, total = set(), 0
    with open(f"{pool}.partial", "wb") as out:
        for path in source_files():
            try:
                raw = Path(path).read_bytes()
                raw.decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha1(raw).digest()
            if b"\x00" in raw or digest in seen:
                continue
            seen.add(digest)
            out.write(raw.replace(b"\r\n", b"\n") + b"\n\n")
            total += len(raw) + 2
            if total >= size:
                break
    os.replace(f"{pool}.partial", pool)
    print(f"text pool: {total / 1e6:.0f} MB from {len(seen)} files", flush=True)
    return pool


def source_files():
    for root in SOURCES:
        for folder, subfolders, names in os.walk(root):
            subfolders.sort()
            if folder.startswith(BENCH["work_dir"]):
                continue
            for name in sorted(names):
                path = os.path.join(folder, name)
                if name.endswith(EXTENSIONS) and not os.path.islink(path):
                    if os.path.getsize(path) > 2048:
                        yield path


def train_tokenizer(pool, folder):
    """A byte-level BPE of GPT-J's size (50,400 ids) with GPT-J's <|endoftext|>, saved in folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sample = Path(folder).with_name("tokenizer-training.txt")
    with open(pool, "rb") as text:
        sample.write_bytes(text.read(BENCH["tokenizer_training_bytes"]))
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(sample)], vocab_size=BENCH["vocab_size"], special_tokens=["<|endoftext|>"],
              show_progress=False)
    eos = "<|endoftext|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eos, eos_token=eos,
                                        unk_token=eos)
    tokenizer.save_pretrained(folder)
    return str(folder)


def old_checkout(work):
    """A copy of the repo at BENCH["old_commit"] (git archive), for the old token_split.py."""
    folder = work / f"repo-{BENCH['old_commit']}"
    if not (folder / "token_split.py").exists():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", BENCH["old_commit"]], cwd=REPO,
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def make_corpus(work, pool, name, case):
    """case["files"] files of about equal size, case["bytes"] in all, cut at line ends from the pool
    (which is read again from its start if the corpus is larger)."""
    folder = work / "corpora" / name / "text"
    spec = json.dumps(case, sort_keys=True)
    if (folder.parent / "spec.json").exists() and (folder.parent / "spec.json").read_text() == spec:
        return folder
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    per_file = case["bytes"] // case["files"]
    with open(pool, "rb") as text:
        for number in range(case["files"]):
            left = per_file if number < case["files"] - 1 else case["bytes"] - per_file * number
            with open(folder / f"part{number:05d}.txt", "wb") as out:
                while left > 0:
                    chunk = text.read(min(left, 4 << 20))
                    if not chunk:
                        text.seek(0)
                        continue
                    out.write(chunk)
                    left -= len(chunk)
                out.write(text.readline())  # to the end of the line
    (folder.parent / "spec.json").write_text(spec)
    return folder


def run_case(name, case, work, pool, tokenizer, old_repo):
    text_dir = make_corpus(work, pool, name, case)
    corpus_bytes = sum(path.stat().st_size for path in text_dir.iterdir())
    corpus = {"bytes": corpus_bytes, "files": case["files"],
              "from": "text files of this machine: " + ", ".join(SOURCES)}
    record = {"corpus": corpus, "date": datetime.date.today().isoformat(),
              "command": "python bench/token_bench.py " + " ".join(sys.argv[1:]),
              "commit": measured_commit()}
    nice = case.get("nice", 0)
    modes = ["threads", "processes", "transformers"] if case.get("more") else ["threads"]
    record["tokenizer_alone"] = {mode: tokenizer_alone_run(text_dir, tokenizer, mode, nice, work)
                                 for mode in modes}
    new, old = work / "dataset-new", work / "dataset-old"
    record["token_split"] = token_split_run(REPO, text_dir, tokenizer, new, nice, corpus_bytes)
    record["tokens"] = record["token_split"]["tokens"]
    if case.get("old"):
        record["token_split_old"] = token_split_run(old_repo, text_dir, tokenizer, old, nice,
                                                    corpus_bytes)
        record["same_samples_and_facts_as_old"] = in_child("same_datasets", old, new)
        shutil.rmtree(old)
    shutil.rmtree(new)
    fastest = min(record["tokenizer_alone"].values(), key=lambda run: run["in_script_s"])
    ours = record["token_split"]
    record["ratio_to_tokenizer_alone"] = round(ours["in_script_s"] / fastest["in_script_s"], 3)
    record["ratio_to_tokenizer_alone_whole_process"] = round(ours["wall_s"] / fastest["wall_s"], 3)
    return record


# token_split.main() in a child: the repo to import it from and its SETTINGS come as arguments.
TOKEN_SPLIT_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import token_split
token_split.SETTINGS.update(json.loads(sys.argv[2]))
token_split.main()
"""


def token_split_run(repo, text_dir, tokenizer, dataset_dir, nice, corpus_bytes):
    settings = {"text_dir": str(text_dir), "dataset_dir": str(dataset_dir),
                "tokenizer": str(tokenizer), "block_size": BENCH["block_size"]}
    shutil.rmtree(dataset_dir, ignore_errors=True)
    command = [sys.executable, "-c", TOKEN_SPLIT_CHILD, str(repo), json.dumps(settings)]
    run = measure(command, nice, repo, dataset_dir.with_name(dataset_dir.name + ".log"))
    facts = json.loads((dataset_dir / "token_split.json").read_text())
    in_script = float(re.search(r"Saved to .* in ([\d.]+) s", run.pop("output")).group(1))
    return {**run, "in_script_s": in_script, "mb_per_s": round(corpus_bytes / 1e6 / in_script, 2),
            "tokens": facts["tokens"], "samples": {split: facts["counts"][split]["samples"]
                                                  for split in ("train", "validation")},
            "dataset_bytes": sum(path.stat().st_size for path in dataset_dir.rglob("*")
                                 if path.is_file())}


def tokenizer_alone_run(text_dir, tokenizer, mode, nice, work):
    command = [sys.executable, "-c", CHILD, str(REPO / "bench"), "tokenizer_alone", str(text_dir),
               str(tokenizer), mode]
    run = measure(command, nice, REPO, work / f"tokenizer-{mode}.log")
    result = json.loads(run.pop("output").strip().splitlines()[-1])
    corpus_bytes = sum(path.stat().st_size for path in Path(text_dir).iterdir())
    return {**run, "in_script_s": result["seconds"], "tokens": result["tokens"],
            "mb_per_s": round(corpus_bytes / 1e6 / result["seconds"], 2)}


def tokenizer_alone(text_dir, tokenizer_dir, mode):
    """The fast tokenizer by itself on every file of text_dir: read in token_split's pieces (cut at
    a line end or space), in batches of token_split's size, ids returned as lists. Returns seconds
    (from before transformers is imported, as token_split's count does) and tokens (+1 EOS per file,
    as token_split)."""
    started = time.time()
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO))
    from corpus import WORK

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if mode != "processes" else None
    files = sorted(Path(text_dir).rglob("*.txt"))
    batches = text_batches(files, WORK["piece_chars"], WORK["batch_chars"])
    if mode == "threads":  # one process; the Rust tokenizer spreads each batch over every core
        encoder = tokenizer.backend_tokenizer
        counts = (sum(len(encoding.ids)
                      for encoding in encoder.encode_batch_fast(batch, add_special_tokens=False))
                  for batch in batches)
    elif mode == "transformers":  # what most code calls: with character offsets, 3x the work
        counts = (sum(map(len, tokenizer(batch, add_special_tokens=False)["input_ids"]))
                  for batch in batches)
    else:  # two processes of one thread each, a batch at a time
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(
            os.cpu_count(), initializer=start_worker, initargs=(tokenizer_dir,))
        counts = pool.imap(count_tokens, batches)
    tokens = sum(counts)
    return {"seconds": round(time.time() - started, 2), "tokens": tokens + len(files)}


def text_batches(files, piece_chars, batch_chars):
    """Lists of about batch_chars of text, in pieces of about piece_chars cut after a line end or
    space."""
    import codecs

    batch, size = [], 0
    for path in files:
        decoder, rest = codecs.getincrementaldecoder("utf-8")(), ""
        with open(path, "rb") as file:
            while True:
                raw = file.read(piece_chars)
                text = rest + decoder.decode(raw, final=not raw)
                cut = max(text.rfind("\n"), text.rfind(" ")) if raw else len(text)  # before it
                cut = cut if cut > 0 else len(text)
                piece, rest = text[:cut], text[cut:]
                batch.append(piece)
                size += len(piece)
                if size >= batch_chars:
                    yield batch
                    batch, size = [], 0
                if not raw:
                    break
    if batch:
        yield batch


def writer_run(way):
    folder = Path(BENCH["work_dir"]) / f"writer-{way}"
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-c", CHILD, str(REPO / "bench"), "write_samples", way, str(folder)]
    run = measure(command, 0, REPO, folder.with_name(folder.name + ".log"))
    run.pop("output")
    run["dataset_bytes"] = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    shutil.rmtree(folder)
    return run


def write_samples(way, folder):
    """WRITERS["samples"] samples of random ids (full blocks) written into folder one way or the
    other, in batches of 512 as token_split.py cuts them."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    import artifacts
    from token_split import sample_columns

    block_size, dtype, rng = BENCH["block_size"], np.uint16, np.random.default_rng(0)

    def batches():
        for start in range(0, WRITERS["samples"], 512):
            rows = min(512, WRITERS["samples"] - start)
            ids = rng.integers(0, BENCH["vocab_size"], (rows, block_size), dtype=dtype)
            yield sample_columns(ids, np.full(rows, block_size))

    if way == "samples_written":
        Path(folder).mkdir(parents=True)
        with artifacts.samples_written(folder, block_size, dtype) as (write, _):
            for columns in batches():
                write("train", columns)
        return way
    import datasets

    def samples():  # from_generator takes one sample at a time
        for columns in batches():
            for row in range(len(columns["input_ids"])):
                yield {name: values[row] for name, values in columns.items()}

    features = artifacts.sample_features(block_size, dtype)
    train = datasets.Dataset.from_generator(samples, features=features,
                                            cache_dir=str(Path(folder) / "cache"))
    datasets.DatasetDict(train=train).save_to_disk(str(Path(folder) / "dataset"))
    return way


def start_worker(tokenizer_dir):
    global ENCODER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread: the processes are the parallelism
    from tokenizers import Tokenizer

    ENCODER = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))


def count_tokens(batch):
    encodings = ENCODER.encode_batch_fast(batch, add_special_tokens=False)
    return sum(len(encoding.ids) for encoding in encodings)


def measure(command, nice, cwd, log, quiet=True):
    """Run command as a child process (after the machine is quiet); its wall time, peak RSS, the CPU
    time other processes used meanwhile, and its output."""
    if quiet:
        wait_until_quiet()
    if nice:
        command = ["nice", "-n", str(nice), *command]
    cpu_before, started = busy_cpu_seconds(), time.time()
    with open(log, "w") as output:
        child = subprocess.Popen(command, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # its peak RSS (or its largest child's)
        child.returncode = os.waitstatus_to_exitcode(status)
    wall, busy = time.time() - started, busy_cpu_seconds() - cpu_before
    text = Path(log).read_text()
    if child.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({child.returncode}); see {log}:\n{text[-3000:]}")
    own_cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 3),
            "cpu_s": round(own_cpu, 1), "other_processes_cpu_s": round(max(0.0, busy - own_cpu), 1),
            "nice": nice, "output": text}


def busy_cpu_seconds():
    """CPU seconds all processes of the machine have used since boot (from /proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(longest=600):
    """Wait until the other processes of this machine use less than BENCH["quiet_cpu_share"] of
    it."""
    for _ in range(longest // 5):
        before = busy_cpu_seconds()
        time.sleep(5)
        if (busy_cpu_seconds() - before) / 5 / os.cpu_count() < BENCH["quiet_cpu_share"]:
            return
    print("warning: the machine stayed busy; measuring anyway (see other_processes_cpu_s)",
          flush=True)


def same_datasets(old_dir, new_dir):
    """Whether both datasets hold the same samples (every column's values) and the same facts."""
    import numpy as np
    from datasets import load_from_disk

    old_dir, new_dir = Path(old_dir), Path(new_dir)
    old, new = load_from_disk(str(old_dir)), load_from_disk(str(new_dir))
    for split in ("train", "validation"):
        if len(old[split]) != len(new[split]):
            return False
        for column in ("input_ids", "attention_mask", "labels"):
            values = [np.asarray(dataset[split].data.column(column).combine_chunks().flatten())
                      for dataset in (old, new)]
            if not np.array_equal(*values):
                return False
    facts = [json.loads((folder / "token_split.json").read_text()) for folder in (old_dir, new_dir)]
    for fact in facts:
        fact.pop("created")
    return facts[0] == facts[1] and list(facts[0]) == list(facts[1])


def measured_commit():
    """The commit whose token_split.py, corpus.py and artifacts.py are measured (+ "-dirty": changed
    since)."""
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "token_split.py", "corpus.py",
                              "artifacts.py"])
    return commit.stdout.strip() + ("-dirty" if changed.returncode else "")


def machine():
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(memory / GIB, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def versions():
    from importlib.metadata import version

    names = ("tokenizers", "transformers", "datasets", "pyarrow", "numpy")
    return {name: version(name) for name in names}


def save(name, record):
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"cases": {}}
    floor = measure(["true"], 0, REPO, Path(BENCH["work_dir"]) / "true.log", quiet=False)
    results.update(machine=machine(), versions=versions(), settings=BENCH,
                   command="python bench/token_bench.py " + " ".join(sys.argv[1:]),
                   rss_floor_gib=floor["peak_rss_gib"])
    results["cases"][name] = record
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def summary_line(name, record):
    new = record["token_split"]
    alone = min(record["tokenizer_alone"].values(), key=lambda run: run["in_script_s"])
    line = (f"{name}: token_split {new['in_script_s']:.1f} s ({new['mb_per_s']} MB/s), peak "
            f"{new['peak_rss_gib']:.2f} GiB; tokenizer alone {alone['in_script_s']:.1f} s; ratio "
            f"{record['ratio_to_tokenizer_alone']}")
    if "token_split_old" in record:
        old = record["token_split_old"]
        line += (f"; old {old['in_script_s']:.1f} s, {old['peak_rss_gib']:.2f} GiB; same dataset "
                 f"as old: {record['same_samples_and_facts_as_old']}")
    return line


if __name__ == "__main__":
    main()
