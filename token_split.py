"""Turn text/*.txt into fixed-length training samples for finetune.py: `python token_split.py`.

Prepare once, train from disk: all tokenizing and chunking happens here; finetune.py loads what
this script saved and checks its facts. Memory stays bounded whatever the size of a file or of the
corpus: text is read in pieces (corpus.py), tokens go to a scratch file, samples to disk as cut.
"""

import ast
import math
import random
import sys
import time
from pathlib import Path

import numpy as np

import artifacts
import corpus

SETTINGS = {
    "text_dir": "text",  # each *.txt below this folder (sub-folders, linked ones too) is a document
    "dataset_dir": "data/tokenized",  # where the train/validation dataset goes (replaced whole)
    "tokenizer": "EleutherAI/gpt-j-6B",  # hub name or local folder; must be the model's tokenizer
    "block_size": 2048,  # tokens per sample; GPT-J's context is 2048, shorter blocks train faster
    "validation_share": 0.05,  # part of the tokens held out to measure validation loss
    "seed": 42,  # chooses the validation documents or blocks; same seed, same split
}

TOKENS_FILE = "tokens.bin"  # scratch, in the dataset folder while it is written: all ids in order


def main():
    started = time.time()
    text_dir, dataset_dir = SETTINGS["text_dir"], SETTINGS["dataset_dir"]
    try:
        files, notes = corpus.find_text_files(text_dir)
        documents, skipped = corpus.check_text_files(files, text_dir)
        # Written beside the old dataset and swapped in at the end (artifacts.py): an error or
        # Ctrl-C leaves the old one as it was, and nothing half-written beside it.
        with artifacts.written_whole(dataset_dir, "token_split.py",
                                     "SETTINGS['dataset_dir']") as partial:
            tokenizer = load_tokenizer(SETTINGS["tokenizer"])
            token_counts = tokenize(documents, text_dir, tokenizer, partial / TOKENS_FILE)
            split = split_train_validation(token_counts, SETTINGS)
            sample_counts = write_samples(partial, split, token_counts, tokenizer, SETTINGS)
            facts = dataset_facts(SETTINGS, tokenizer, documents, skipped, token_counts, split,
                                  sample_counts)
            artifacts.write_dataset_facts(partial, facts)  # last: marks the dataset complete
    except KeyboardInterrupt:
        message = f"\ntoken_split.py: stopped by Ctrl-C; '{dataset_dir}' is as it was."
        raise SystemExit(message) from None
    report(facts, notes, SETTINGS, time.time() - started)


def load_tokenizer(name):
    """The model's tokenizer, from a local folder or the hub (downloaded once, then cached)."""
    import failures  # imported here, after the text is checked: with transformers, seconds
    from transformers import AutoTokenizer
    with failures.model_within_reach(name, "token_split.py", "tokenizer", "SETTINGS['tokenizer']"):
        # No length limit: blocks are cut here (no "Token indices sequence length ..." warning)
        tokenizer = AutoTokenizer.from_pretrained(name, model_max_length=sys.maxsize)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"token_split.py: the tokenizer '{name}' has no end-of-text (EOS) token "
                         f"to put between documents.")
    if not tokenizer.is_fast:
        raise SystemExit(f"token_split.py: the tokenizer '{name}' has no tokenizer.json (a fast "
                         f"tokenizer), which token_split.py needs to use every core.")
    return tokenizer


def tokenize(documents, text_dir, tokenizer, token_file):
    """Tokenize every document into token_file, EOS after each, and return each one's token count.

    EOS after every document tells the model where one text stops and the next begins (and teaches
    it to stop), so it also stands between documents once they are joined into one stream. Each
    batch of exact pieces (corpus.py) is spread over all cores by the tokenizer's own threads."""
    dtype = artifacts.token_dtype(len(tokenizer))
    counts = [0] * len(documents)
    with open(token_file, "wb") as tokens:
        for batch in corpus.piece_batches(documents, text_dir, tokenizer):
            # The Rust tokenizer's encode_batch_fast: ids without character offsets, 3x faster here
            encodings = tokenizer.backend_tokenizer.encode_batch_fast(
                [text for _, text, _ in batch], add_special_tokens=False)
            for (number, _, last), encoding in zip(batch, encodings):
                ids = encoding.ids + [tokenizer.eos_token_id] if last else encoding.ids
                tokens.write(np.array(ids, dtype).tobytes())
                counts[number] += len(ids)
    return counts


def split_train_validation(token_counts, settings):
    """Hold out validation data, reproducibly for a given seed, decided from the documents' token
    counts alone. Returns a sentence on how, and which documents (by number) or blocks (of the
    joined stream) are held out.

    By whole documents where there are enough of them (validation text the model never saw, not even
    the rest of a document it trained on); otherwise by whole blocks of the joined stream."""
    block_size, share = settings["block_size"], settings["validation_share"]
    total_tokens = sum(token_counts)
    if total_tokens < block_size:
        raise SystemExit(f"token_split.py: the corpus has {total_tokens} tokens, fewer than one "
                         f"block of {block_size}. Add more text to {settings['text_dir']}/ or "
                         f"lower SETTINGS['block_size'].")
    rng = random.Random(settings["seed"])

    # By document: shuffled documents go to validation until they hold `share` of the tokens. Used
    # only if that stays near the share asked for and leaves at least one full block to train on.
    order = list(range(len(token_counts)))
    rng.shuffle(order)
    held_out, held_tokens = set(), 0
    for index in order:
        if held_tokens >= share * total_tokens:
            break
        held_out.add(index)
        held_tokens += token_counts[index]
    near_share = held_tokens <= 2 * share * total_tokens
    if len(token_counts) >= 2 and near_share and total_tokens - held_tokens >= block_size:
        method = f"by document: {len(held_out)} of {len(token_counts)} documents held out"
        return {"method": method, "held_out": {"validation_documents": sorted(held_out)}}

    # By block: too few or too uneven documents. Whole blocks of the stream are held out; with two
    # blocks or more, never none.
    block_count = -(-total_tokens // block_size)
    validation_count = max(1, round(share * block_count)) if block_count >= 2 else 0
    validation_blocks = rng.sample(range(block_count), validation_count)
    method = (f"by block: {validation_count} of {block_count} blocks held out (too few "
              f"documents, or too uneven, to hold out whole ones)" if validation_count else
              "none: the corpus fills only one block, so there is no validation data (add text "
              "for one)")
    return {"method": method, "held_out": {"validation_blocks": sorted(validation_blocks)}}


def write_samples(partial, split, token_counts, tokenizer, settings):
    """Cut the token stream into samples of exactly block_size tokens, written into the dataset's
    train and validation splits as they are cut. Returns each split's counts (artifacts.py).

    Samples span document boundaries (the EOS marks them), so no token is wasted on padding except
    in the one last block of each stream, padded rather than dropped: no token of the text is lost.
    The train stream is the training documents in order, the validation stream the held-out ones;
    split by block, the stream of all documents is cut and its blocks dealt."""
    block_size, pad_id = settings["block_size"], tokenizer.eos_token_id  # pad: any id, it is masked
    dtype = artifacts.token_dtype(len(tokenizer))
    ends = np.cumsum(token_counts)
    documents = list(zip(ends - np.array(token_counts), ends))  # (start, end) in the token file
    if "validation_documents" in split["held_out"]:
        validation = set(split["held_out"]["validation_documents"])
        streams = {"train": [documents[n] for n in range(len(documents)) if n not in validation],
                   "validation": [documents[n] for n in sorted(validation)]}
    else:
        streams = {"by block": [(0, ends[-1])]}
    validation_blocks = np.array(split["held_out"].get("validation_blocks", []), dtype=np.int64)
    with artifacts.samples_written(partial, block_size, dtype) as (write, counts):
        for stream, ranges in streams.items():
            first = 0  # number of this stream's first block in the batch
            chunks = read_tokens(partial / TOKENS_FILE, ranges, dtype)
            for ids, lengths in cut_blocks(chunks, block_size, pad_id):
                numbers = np.arange(first, first + len(ids))
                first += len(ids)
                in_validation = (np.isin(numbers, validation_blocks) if stream == "by block" else
                                 np.full(len(ids), stream == "validation"))
                write("train", sample_columns(ids[~in_validation], lengths[~in_validation]))
                write("validation", sample_columns(ids[in_validation], lengths[in_validation]))
    (partial / TOKENS_FILE).unlink()
    return counts


def read_tokens(token_file, ranges, dtype, chunk_tokens=1 << 20):
    """The ids of the (start, end) ranges of token_file, in chunks of at most chunk_tokens."""
    for start, end in ranges:
        for first in range(int(start), int(end), chunk_tokens):
            yield np.fromfile(token_file, dtype, min(chunk_tokens, int(end) - first),
                              offset=first * np.dtype(dtype).itemsize)


def cut_blocks(chunks, block_size, pad_id):
    """Yields (ids, real tokens per row): rows of block_size tokens, the last one padded."""
    rest = None
    for chunk in chunks:
        tokens = chunk if rest is None else np.concatenate([rest, chunk])
        whole = len(tokens) // block_size * block_size
        if whole:
            yield tokens[:whole].reshape(-1, block_size), np.full(whole // block_size, block_size)
        rest = tokens[whole:]
    if rest is not None and len(rest):
        ids = np.full((1, block_size), pad_id, dtype=rest.dtype)
        ids[0, :len(rest)] = rest
        yield ids, np.array([len(rest)])


def sample_columns(ids, lengths):
    """A sample's three columns. Padding (after a block's `lengths` real tokens) gets attention_mask
    0, so the model never attends to it, and label -100, which the loss skips, so it is never
    trained to predict it; every other label is the token itself (the model shifts them by one)."""
    mask = np.arange(ids.shape[1]) < lengths[:, None]
    return {"input_ids": ids, "attention_mask": mask.astype(np.int8),
            "labels": np.where(mask, ids.astype(np.int32), np.int32(-100))}


def dataset_facts(settings, tokenizer, documents, skipped, token_counts, split, sample_counts):
    """The facts finetune.py checks before it loads the model, and a record of what went in."""
    return {
        "tokenizer": settings["tokenizer"],
        **artifacts.tokenizer_fingerprint(tokenizer),
        **{key: settings[key] for key in ("block_size", "validation_share", "seed")},
        "split": split["method"],
        **split["held_out"],  # validation_documents or validation_blocks: anyone can rebuild it
        "documents": len(documents), "tokens": sum(token_counts), "counts": sample_counts,
        "files": [{"path": name, "tokens": count}
                  for (name, _), count in zip(documents, token_counts)],
        "skipped_files": skipped, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def report(facts, notes, settings, seconds):
    counts, names = facts["counts"], [entry["path"] for entry in facts["files"]]
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6:,} more" if len(names) > 6 else "")
    skipped = f", skipped {len(facts['skipped_files'])} empty" if facts["skipped_files"] else ""
    files = f"{len(names):,} file{'s' * (len(names) != 1)}"
    print(f"\nRead {files} from {settings['text_dir']}/ ({shown}){skipped}: {facts['tokens']:,} "
          f"tokens, EOS after each document. Each file and its tokens are listed in "
          f"{settings['dataset_dir']}/{artifacts.DATASET_FACTS}.")
    for note in notes:  # links followed or broken, files reached twice
        print(f"  {note}")
    padding = counts["train"]["padding_tokens"] + counts["validation"]["padding_tokens"]
    print(f"Cut into blocks of {facts['block_size']} tokens: {counts['train']['samples']:,} train "
          f"samples, {counts['validation']['samples']:,} validation samples ({padding} padding "
          f"tokens in all).")
    print(f"Validation split {facts['split']}.")
    print(f"Saved to {settings['dataset_dir']}/ in {seconds:.1f} s.\n")
    full_batch, training = finetune_settings()  # how many optimizer steps these samples make
    micro, accumulation = (training[key] for key in ("per_device_train_batch_size",
                                                     "gradient_accumulation_steps"))
    one_gpu = "auto" not in (micro, accumulation)  # TRAINING's own numbers: full batch per GPU
    full_batch = micro * accumulation if one_gpu else full_batch
    steps, epochs = math.ceil(counts["train"]["samples"] / full_batch), training["num_train_epochs"]
    print(f"Batch plan: {full_batch} samples ({full_batch * facts['block_size']:,} tokens) per "
          f"optimizer step{' with one GPU' * one_gpu} -> {steps:,} optimizer steps per epoch, "
          f"{math.ceil(steps * epochs):,} in {epochs} epoch(s); finetune.py prints its plan.")

def finetune_settings():
    """finetune.py's FULL_BATCH and TRAINING: its dicts if imported, else read from its source."""
    if "finetune" in sys.modules:  # the demo and the tests change them; importing would load torch
        return sys.modules["finetune"].FULL_BATCH, sys.modules["finetune"].TRAINING
    source = ast.parse(Path(__file__).with_name("finetune.py").read_text()).body
    values = {node.targets[0].id: ast.literal_eval(node.value) for node in source if isinstance(
        node, ast.Assign) and getattr(node.targets[0], "id", "") in ("FULL_BATCH", "TRAINING")}
    return values["FULL_BATCH"], values["TRAINING"]

if __name__ == "__main__":
    main()
