"""Turn text/*.txt into fixed-length training samples, saved to disk for finetune.py.

    python token_split.py

Prepare once, train from disk: all tokenizing and chunking happens here, and finetune.py only loads
what this script saved (with the facts it needs to check that the data fits the model).
"""

import random
import shutil
import sys
import time
from pathlib import Path

import artifacts

SETTINGS = {
    "text_dir": "text",  # every *.txt below this folder (sub-folders too) is one document
    "dataset_dir": "data/tokenized",  # where the train/validation dataset is written (replaced whole)
    "tokenizer": "EleutherAI/gpt-j-6B",  # hub name or local folder; must be the model's tokenizer
    "block_size": 2048,  # tokens per sample; GPT-J's context is 2048, shorter blocks train faster
    "validation_share": 0.05,  # part of the tokens held out to measure validation loss
    "seed": 42,  # chooses the validation documents or blocks; same seed, same split
}


def main():
    started = time.time()
    files = find_text_files(SETTINGS["text_dir"])
    documents, skipped = read_documents(files, SETTINGS["text_dir"])
    tokenizer = load_tokenizer(SETTINGS["tokenizer"])
    token_lists = tokenize(documents, tokenizer)
    split = split_train_validation(token_lists, tokenizer, SETTINGS)
    facts = dataset_facts(SETTINGS, tokenizer, documents, skipped, token_lists, split)
    save(split["samples"], facts, SETTINGS["dataset_dir"])
    report(facts, SETTINGS, time.time() - started)


def find_text_files(text_dir):
    """Every *.txt below text_dir, each file once, in a stable (sorted by path) order."""
    root = Path(text_dir)
    if not root.is_dir():
        raise SystemExit(
            f"token_split.py: the text folder '{root}' does not exist. Put your .txt files there "
            f"(sub-folders are fine), or point SETTINGS['text_dir'] in token_split.py at them."
        )
    files, seen = [], set()
    for path in sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix()):
        real = path.resolve()  # a file reached twice through a link is read once
        if path.is_file() and real not in seen:
            seen.add(real)
            files.append(path)
    if not files:
        raise SystemExit(
            f"token_split.py: no .txt files found under '{root}'. Only files ending in .txt are read; "
            f"copy or rename your training text there."
        )
    return files


def read_documents(files, text_dir):
    """Decode each file as UTF-8 text. Returns [(relative path, text)] and the skipped empty files."""
    documents, skipped = [], []
    for path in files:
        name = path.relative_to(text_dir).as_posix()
        raw = path.read_bytes()
        if b"\x00" in raw:
            raise SystemExit(
                f"token_split.py: '{path}' looks binary (it holds a NUL byte at offset {raw.index(0)}). "
                f"Only plain UTF-8 text belongs in {text_dir}/: remove or convert that file."
            )
        try:
            text = raw.decode("utf-8-sig")  # -sig: a UTF-8 byte-order mark at the start is dropped
        except UnicodeDecodeError as error:
            raise SystemExit(
                f"token_split.py: '{path}' is not valid UTF-8 (byte offset {error.start}: "
                f"{raw[error.start:error.start + 4]!r}). Convert it, e.g. "
                f"`iconv -f latin1 -t utf-8 '{path}' > fixed.txt`, or remove it."
            ) from None
        # Windows and old-Mac line ends become '\n', so the same text gives the same tokens everywhere.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            print(f"warning: skipping '{path}': it is empty or holds only white space", file=sys.stderr)
            skipped.append(name)
            continue
        documents.append((name, text))
    if not documents:
        raise SystemExit(f"token_split.py: every .txt file under '{text_dir}' is empty; nothing to train on.")
    return documents, skipped


def load_tokenizer(name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"token_split.py: the tokenizer '{name}' has no end-of-text (EOS) token to put between documents.")
    return tokenizer


def tokenize(documents, tokenizer):
    """One token list per document, each ending in EOS.

    EOS after every document tells the model where one text stops and the next begins (and teaches it
    to stop), so it also stands between documents once they are joined into one stream."""
    token_lists = []
    for number, (name, text) in enumerate(documents, 1):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long texts are fine here
        token_lists.append(ids + [tokenizer.eos_token_id])
        if len(documents) > 20 and number % max(1, len(documents) // 10) == 0:
            print(f"  tokenized {number}/{len(documents)} files", flush=True)
    return token_lists


def cut_blocks(stream, block_size, pad_id):
    """Cut one token stream into samples of exactly block_size tokens.

    Samples span document boundaries (the EOS marks them), so no token is wasted on padding except in
    the one last block, which is padded rather than dropped: no token of the text is lost. Padding gets
    attention_mask 0 and label -100, so the model never attends to it nor is trained to predict it."""
    samples = {"input_ids": [], "attention_mask": [], "labels": []}
    for start in range(0, len(stream), block_size):
        block = stream[start:start + block_size]
        padding = block_size - len(block)
        samples["input_ids"].append(block + [pad_id] * padding)
        samples["attention_mask"].append([1] * len(block) + [0] * padding)
        samples["labels"].append(block + [-100] * padding)
    return samples


def split_train_validation(token_lists, tokenizer, settings):
    """Hold out validation data, reproducibly for a given seed. Returns the samples of both splits, a
    sentence on how, and which documents (by number) or blocks (of the joined stream) were held out.

    By whole documents where there are enough of them (validation text the model never saw, not even
    the rest of a document it trained on); otherwise by whole blocks of the joined stream."""
    block_size, share = settings["block_size"], settings["validation_share"]
    total_tokens = sum(len(tokens) for tokens in token_lists)
    if total_tokens < block_size:
        raise SystemExit(
            f"token_split.py: the corpus has {total_tokens} tokens, fewer than one block of {block_size}. "
            f"Add more text to {settings['text_dir']}/ or lower SETTINGS['block_size']."
        )
    rng = random.Random(settings["seed"])
    pad_id = tokenizer.eos_token_id  # any id works: masked out by attention_mask and labels

    # By document: shuffled documents go to validation until they hold `share` of the tokens. Used only
    # if that stays near the share asked for and leaves at least one full block to train on.
    order = list(range(len(token_lists)))
    rng.shuffle(order)
    held_out, held_tokens = set(), 0
    for index in order:
        if held_tokens >= share * total_tokens:
            break
        held_out.add(index)
        held_tokens += len(token_lists[index])
    train_tokens = total_tokens - held_tokens
    if len(token_lists) >= 2 and held_tokens <= 2 * share * total_tokens and train_tokens >= block_size:
        train_stream = [t for i, tokens in enumerate(token_lists) if i not in held_out for t in tokens]
        validation_stream = [t for i in sorted(held_out) for t in token_lists[i]]
        splits = {
            "train": cut_blocks(train_stream, block_size, pad_id),
            "validation": cut_blocks(validation_stream, block_size, pad_id),
        }
        method = f"by document: {len(held_out)} of {len(token_lists)} documents held out"
        return {"samples": splits, "method": method, "held_out": {"validation_documents": sorted(held_out)}}

    # By block: too few or too uneven documents. Whole blocks of the stream are held out.
    blocks = cut_blocks([t for tokens in token_lists for t in tokens], block_size, pad_id)
    block_count = len(blocks["input_ids"])
    validation_count = max(1, round(share * block_count)) if block_count >= 2 else 0
    validation_blocks = set(rng.sample(range(block_count), validation_count))
    splits = {
        name: {column: [row for i, row in enumerate(rows) if (i in validation_blocks) == (name == "validation")]
               for column, rows in blocks.items()}
        for name in ("train", "validation")
    }
    if validation_count == 0:
        method = "none: the corpus fills only one block, so there is no validation data (add text for one)"
    else:
        method = (f"by block: {validation_count} of {block_count} blocks held out "
                  f"(too few documents, or too uneven, to hold out whole ones)")
    return {"samples": splits, "method": method, "held_out": {"validation_blocks": sorted(validation_blocks)}}


def dataset_facts(settings, tokenizer, documents, skipped, token_lists, split):
    """The facts finetune.py checks before it loads the model, and a record of what went in."""
    counts = {
        name: {
            "samples": len(samples["input_ids"]),
            "tokens": sum(sum(mask) for mask in samples["attention_mask"]),
            "padding_tokens": sum(mask.count(0) for mask in samples["attention_mask"]),
        }
        for name, samples in split["samples"].items()
    }
    return {
        "tokenizer": settings["tokenizer"],
        **artifacts.tokenizer_fingerprint(tokenizer),
        "block_size": settings["block_size"],
        "validation_share": settings["validation_share"],
        "seed": settings["seed"],
        "split": split["method"],
        **split["held_out"],  # validation_documents or validation_blocks: lets anyone rebuild the split
        "documents": len(documents),
        "tokens": sum(len(tokens) for tokens in token_lists),
        "counts": counts,
        "files": [{"path": name, "tokens": len(tokens)} for (name, _), tokens in zip(documents, token_lists)],
        "skipped_files": skipped,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def save(splits, facts, dataset_dir):
    """Write the dataset next to its final place, then swap it in: an earlier dataset is replaced only
    once the new one is complete, and an interrupted run leaves no folder that looks complete."""
    from datasets import Dataset, DatasetDict

    partial = artifacts.partial_path(dataset_dir)
    shutil.rmtree(partial, ignore_errors=True)
    DatasetDict({name: Dataset.from_dict(split) for name, split in splits.items()}).save_to_disk(str(partial))
    artifacts.write_dataset_facts(partial, facts)  # last: its presence marks the dataset complete
    artifacts.swap_in(partial, dataset_dir)


def report(facts, settings, seconds):
    counts = facts["counts"]
    print(f"\nRead {facts['documents']} files from {settings['text_dir']}/"
          + (f" (skipped {len(facts['skipped_files'])} empty)" if facts["skipped_files"] else "")
          + f": {facts['tokens']:,} tokens, EOS after each document.")
    print(f"Cut into blocks of {facts['block_size']} tokens: {counts['train']['samples']:,} train samples, "
          f"{counts['validation']['samples']:,} validation samples "
          f"({counts['train']['padding_tokens'] + counts['validation']['padding_tokens']} padding tokens in all).")
    print(f"Validation split {facts['split']}.")
    print(f"Saved to {settings['dataset_dir']}/ in {seconds:.1f} s.\n")
    import finetune  # its TRAINING settings say what these samples will mean for training
    import plan

    print(plan.batch_plan(counts["train"]["samples"], finetune.TRAINING, plan.gpu_count(), facts["block_size"]))


if __name__ == "__main__":
    main()
