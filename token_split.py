"""Turn text/*.txt into fixed-length training samples, saved to disk for finetune.py.

    python token_split.py

Prepare once, train from disk: all tokenizing and chunking happens here, and finetune.py only loads
what this script saved (with the facts it needs to check that the data fits the model).

Memory stays bounded whatever the size of the corpus or of one file: files are read and tokenized in
pieces, the tokens go to a scratch file, and the samples are written to disk as they are cut.
"""

import codecs
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

import artifacts

SETTINGS = {
    "text_dir": "text",  # each *.txt below this folder (sub-folders, linked ones too) is a document
    "dataset_dir": "data/tokenized",  # where the train/validation dataset goes (replaced whole)
    "tokenizer": "EleutherAI/gpt-j-6B",  # hub name or local folder; must be the model's tokenizer
    "block_size": 2048,  # tokens per sample; GPT-J's context is 2048, shorter blocks train faster
    "validation_share": 0.05,  # part of the tokens held out to measure validation loss
    "seed": 42,  # chooses the validation documents or blocks; same seed, same split
}

# How the work is done, not what it makes: nothing here changes the dataset (bench/token_bench.py).
WORK = {
    "piece_chars": 64 * 1024,  # text per tokenizer input; a longer file is cut into such pieces
    "batch_chars": 2 * 1024 * 1024,  # text per tokenizer call, spread over all cores (~0.3 GB RAM)
    "read_bytes": 1024 * 1024,  # bytes per read while every file is checked before the long work
    "progress_after_s": 2,  # a progress bar (MB, MB/s, files) shows once a stage takes this long
}

TOKENS_FILE = "tokens.bin"  # scratch, in the dataset folder while it is written: all ids in order


def main():
    started = time.time()
    text_dir, dataset_dir = SETTINGS["text_dir"], SETTINGS["dataset_dir"]
    try:
        files, notes = find_text_files(text_dir)
        documents, skipped = check_text_files(files, text_dir)
        # Written beside the old dataset and swapped in at the end (artifacts.py): an error or
        # Ctrl-C leaves the old one as it was, and nothing half-written beside it.
        setting = "SETTINGS['dataset_dir']"
        with artifacts.written_whole(dataset_dir, "token_split.py", setting) as partial:
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


def find_text_files(text_dir):
    """Every *.txt below text_dir, each real file once, in a stable order (sorted by path), and
    notes on links for the summary: no text is left out without a word."""
    root = Path(text_dir)
    if root.is_file():
        raise SystemExit(f"token_split.py: the text folder '{root}' is a file, not a folder. Put "
                         f"your .txt files in a folder and point SETTINGS['text_dir'] in "
                         f"token_split.py at it.")
    if not root.is_dir():
        raise SystemExit(
            f"token_split.py: the text folder '{root}' does not exist. Put your .txt files there "
            f"(sub-folders are fine), or point SETTINGS['text_dir'] in token_split.py at them."
        )
    found, notes = walk(root, text_dir)
    files, seen, twice = [], {}, []
    for path in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        real = path.resolve()  # a file reached twice through a link is read once
        if real in seen:
            twice.append(f"'{path}' is '{seen[real]}'")
            continue
        seen[real] = path
        files.append(path)
    if twice:
        examples = ", ".join(twice[:3]) + (", ..." if len(twice) > 3 else "")
        notes.append(f"{len(twice)} file(s) reached through two paths, read once: {examples}")
    if not files:
        raise SystemExit(
            f"token_split.py: no .txt files found under '{root}'. Only files ending in .txt are "
            f"read; copy or rename your training text there."
        )
    return files, notes


def walk(root, text_dir):
    """The *.txt files below root, following linked folders: a link back into a folder it is in
    (read forever) or one that never reaches a file is refused, and a broken one reported."""
    found, notes = [], []
    folders = [(root, {root.resolve()})]  # each with the real folders it is in: a link to one loops
    while folders:
        folder, above = folders.pop()
        for path in folder_entries(folder, text_dir):
            if path.is_symlink():
                target = os.readlink(path)
                try:
                    os.stat(path)
                except FileNotFoundError:
                    print(f"warning: skipping '{path}': it is a link to '{target}', which does not "
                          f"exist", file=sys.stderr)
                    notes.append(f"skipped the broken link '{path}' -> '{target}'")
                    continue
                except OSError:
                    raise SystemExit(f"token_split.py: '{path}' is a link that loops (through "
                                     f"links back to itself) and never reaches a file. Remove it, "
                                     f"or point it at your text.") from None
            if path.is_dir():
                real = path.resolve()
                if real in above:
                    raise SystemExit(f"token_split.py: '{path}' links to '{os.readlink(path)}', a "
                                     f"folder it is itself in, so its files would be read forever. "
                                     f"Remove that link, or point it at a folder outside '{real}'.")
                if path.is_symlink():
                    notes.append(f"followed the link '{path}' -> '{os.readlink(path)}'")
                folders.append((path, above | {real}))
            elif path.name.endswith(".txt") and path.is_file():
                found.append(path)
    return found, notes


def folder_entries(folder, text_dir):
    try:
        return [Path(entry.path) for entry in os.scandir(folder)]
    except OSError as error:
        raise SystemExit(f"token_split.py: cannot look into the folder '{folder}' "
                         f"({error.strerror}). Make it readable (`chmod -R a+rX '{folder}'`), or "
                         f"move it out of {text_dir}/.") from None


def check_text_files(files, text_dir):
    """Read every file once before the long work: each must be readable UTF-8 text (an error names
    the file and the fix). Returns the documents [(name, path, bytes)] and the names skipped."""
    documents, skipped = [], []
    progress = progress_bar("checking", files)
    for path in files:
        name, size, has_text = path.relative_to(text_dir).as_posix(), 0, False
        for text, read in read_text(path, text_dir, WORK["read_bytes"]):
            has_text = has_text or (text != "" and not text.isspace())
            size += read
            progress.update(read)
        done = len(documents) + len(skipped) + 1
        progress.set_postfix_str(f"{done}/{len(files)} files", refresh=False)
        if not has_text:
            print(f"warning: skipping '{path}': it is empty or holds only white space",
                  file=sys.stderr)
            skipped.append(name)
            continue
        documents.append((name, path, size))
    progress.close()
    if not documents:
        raise SystemExit(f"token_split.py: every .txt file under '{text_dir}' is empty; nothing to "
                         f"train on.")
    return documents, skipped


def read_text(path, text_dir, block_bytes):
    """A file's text as (text, bytes read), block by block: checked to be UTF-8 (an error names the
    byte offset and the fix), a byte-order mark at the start dropped, and Windows and old-Mac line
    ends made '\\n', so the same text gives the same tokens everywhere."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, held = 0, ""  # bytes of the file before this block; a '\r' whose '\n' may open the next
    try:
        file = open(path, "rb")
    except OSError as error:
        raise SystemExit(f"token_split.py: cannot read '{path}' ({error.strerror}). Make it "
                         f"readable (`chmod a+r '{path}'`), or move it out of "
                         f"{text_dir}/.") from None
    with file:
        while True:
            raw = file.read(block_bytes)
            read, data = len(raw), raw
            if offset == 0:
                refuse_other_encodings(raw, path)
                if raw.startswith(codecs.BOM_UTF8):
                    data, offset = raw[3:], 3
            if b"\x00" in data:
                raise SystemExit(
                    f"token_split.py: '{path}' looks binary (it holds a NUL byte at offset "
                    f"{offset + data.index(0)}). Only plain UTF-8 text belongs in {text_dir}/: "
                    f"remove or convert that file.")
            pending = len(decoder.getstate()[0])  # bytes of a character the last read cut in two
            try:
                text = held + decoder.decode(data, final=not raw)
            except UnicodeDecodeError as error:
                quoted = error.object[error.start:error.start + 4]
                raise SystemExit(
                    f"token_split.py: '{path}' is not valid UTF-8 (byte offset "
                    f"{offset - pending + error.start}: {quoted!r}). Convert it, e.g. "
                    f"`iconv -f latin1 -t utf-8 '{path}' > fixed.txt`, or remove it.") from None
            offset += len(data)
            held = "\r" if raw and text.endswith("\r") else ""
            text = text[:-1] if held else text
            if text or read:  # at the end, only a last '\r'
                yield text.replace("\r\n", "\n").replace("\r", "\n"), read
            if not raw:
                return


def refuse_other_encodings(start, path):
    """UTF-16 and UTF-32 text (Windows' "Unicode") is not binary, nor UTF-8: say which it is."""
    if start.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        encoding, sign = "UTF-32", "it starts with a UTF-32 byte-order mark"
    elif start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding, sign = "UTF-16", "it starts with a UTF-16 byte-order mark"
    else:
        sample = start[:4096]
        even, odd = sample[0::2], sample[1::2]  # UTF-16 Latin text: every other byte is 0
        if len(odd) < 2 or min(even.count(0), odd.count(0)) > len(odd) // 10:
            return
        if odd.count(0) > len(odd) // 2:
            encoding = "UTF-16LE"
        elif even.count(0) > len(even) // 2:
            encoding = "UTF-16BE"
        else:
            return
        sign = "every other byte is 0"
    raise SystemExit(f"token_split.py: '{path}' looks like {encoding} text ({sign}), not UTF-8. "
                     f"Convert it, e.g. `iconv -f {encoding} -t UTF-8 '{path}' > converted.txt`, "
                     f"and put that in its place.")


def load_tokenizer(name):
    """The model's tokenizer, from a local folder or the hub (downloaded once, then cached)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as error:
        reason = str(error).strip().splitlines()[0]
        if name.startswith(("/", ".", "~")) and not Path(name).exists():
            reason = "no such folder"
        raise SystemExit(
            f"token_split.py: cannot load the tokenizer '{name}' ({reason}); a tokenizer, like "
            f"the model finetune.py loads, comes from the Hugging Face hub (downloaded once, which "
            f"needs the network, then cached) or from a local folder, so without network copy the "
            f"model's folder (its tokenizer files are enough here) to this machine and set "
            f"SETTINGS['tokenizer'] in token_split.py to that folder.") from None
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
    it to stop), so it also stands between documents once they are joined into one stream. Files are
    cut into pieces that give exactly the tokens of the whole file (cut_pieces), which are tokenized
    in batches, each spread over all cores by the tokenizer's own threads."""
    encoder = tokenizer.backend_tokenizer  # the Rust tokenizer that `tokenizer(text)` calls
    piece_chars = WORK["piece_chars"]
    if not pieces_are_exact(encoder):
        piece_chars = None
        print(f"warning: the tokenizer '{tokenizer.name_or_path}' gives other tokens for a text in "
              f"pieces than for it whole, so each file is tokenized whole: memory grows with the "
              f"largest file.", file=sys.stderr)
    dtype = token_dtype(len(tokenizer))
    counts = [0] * len(documents)
    progress = progress_bar("tokenizing", [path for _, path, _ in documents])
    pieces = document_pieces(documents, text_dir, piece_chars)
    with open(token_file, "wb") as tokens:
        for batch in batches(pieces, WORK["batch_chars"]):
            # encode_batch_fast: encode_batch's ids without the character offsets; 3x faster here
            texts = [text for _, text, _, _ in batch]
            encodings = encoder.encode_batch_fast(texts, add_special_tokens=False)
            for (number, _, last, _), encoding in zip(batch, encodings):
                ids = encoding.ids + [tokenizer.eos_token_id] if last else encoding.ids
                tokens.write(np.array(ids, dtype).tobytes())
                counts[number] += len(ids)
            number, _, last, _ = batch[-1]
            progress.set_postfix_str(f"{number + last}/{len(documents)} files", refresh=False)
            progress.update(sum(read for _, _, _, read in batch))  # shows the files done too
    progress.close()
    return counts


def document_pieces(documents, text_dir, piece_chars):
    """(document number, text, whether it is the document's last piece, bytes read) per piece."""
    for number, (_, path, _) in enumerate(documents):
        blocks = read_text(path, text_dir, piece_chars or WORK["read_bytes"])
        for text, last, read in cut_pieces(blocks, piece_chars):
            yield number, text, last, read


# Where a file's text may be cut: just before a space or line break that follows a non-space.
# GPT-J's byte-level BPE pre-tokenizer never joins a non-space to the white space after it, and what
# follows a place where it splits is tokenized as if the text began there, so the pieces' tokens are
# the whole file's (tests/test_token_split_pieces.py checks it; pieces_are_exact, each tokenizer).
CUT = re.compile(r"[ \n](?=\S)")  # searched in the reversed text: finds the last such place first


def cut_pieces(blocks, piece_chars):
    """A file's text blocks as pieces: each block is cut at its last place where text may be cut
    (CUT), the text after it going with the next block. Yields (text, whether it is the last piece,
    bytes read). piece_chars None: the file is one piece.

    A stretch of text with no such place (a long line without spaces, e.g. base64, or CJK text with
    no spaces or line breaks) stays in one piece, however long: its tokens are still exact, but it
    is held in memory whole."""
    parts, read = [], 0  # the text since the last cut, and the bytes it was read from
    blocks = iter(blocks)
    block = next(blocks, ("", 0))
    for following in blocks:  # a block is cut only if another follows it: a small file is one piece
        text, block_read = block
        read += block_read
        found = CUT.search(text[::-1] + (parts[-1][-1:] if parts else "")) if piece_chars else None
        if found is None:
            parts.append(text)
        else:
            cut = len(text) - 1 - found.start()
            yield "".join(parts) + text[:cut], False, read
            parts, read = [text[cut:]], 0
        block = following
    yield "".join(parts) + block[0], True, read + block[1]


PIECES_PROBE = "Dear Anna,\nthe keeper's lamp (lit at 9:45)  burns.\n\n  Indented\tline; 東京 \n e"


def pieces_are_exact(encoder):
    """Whether this tokenizer gives the same tokens for a text cut at every CUT as for it whole:
    true for byte-level BPE such as GPT-J's; not for one that puts a space before every text."""
    cuts = [match.start() for match in re.finditer(r"(?<=\S)[ \n]", PIECES_PROBE)]
    pieces = [PIECES_PROBE[start:end] for start, end in zip([0] + cuts, cuts + [len(PIECES_PROBE)])]
    in_pieces = [token for encoding in encoder.encode_batch_fast(pieces, add_special_tokens=False)
                 for token in encoding.ids]
    return in_pieces == encoder.encode(PIECES_PROBE, add_special_tokens=False).ids


def batches(pieces, batch_chars):
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[1])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def token_dtype(vocab_size):
    """The smallest type that holds every token id: GPT-J's 50,400 fit in 2 bytes (uint16)."""
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def split_train_validation(token_counts, settings):
    """Hold out validation data, reproducibly for a given seed, decided from the documents' token
    counts alone. Returns a sentence on how, and which documents (by number) or blocks (of the
    joined stream) are held out.

    By whole documents where there are enough of them (validation text the model never saw, not even
    the rest of a document it trained on); otherwise by whole blocks of the joined stream."""
    block_size, share = settings["block_size"], settings["validation_share"]
    total_tokens = sum(token_counts)
    if total_tokens < block_size:
        raise SystemExit(
            f"token_split.py: the corpus has {total_tokens} tokens, fewer than one block of "
            f"{block_size}. Add more text to {settings['text_dir']}/ or lower "
            f"SETTINGS['block_size']."
        )
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
    if validation_count == 0:
        method = ("none: the corpus fills only one block, so there is no validation data "
                  "(add text for one)")
    else:
        method = (f"by block: {validation_count} of {block_count} blocks held out "
                  f"(too few documents, or too uneven, to hold out whole ones)")
    return {"method": method, "held_out": {"validation_blocks": sorted(validation_blocks)}}


def write_samples(partial, split, token_counts, tokenizer, settings):
    """Cut the token stream into samples of exactly block_size tokens, written into the dataset's
    train and validation splits as they are cut. Returns each split's counts.

    Samples span document boundaries (the EOS marks them), so no token is wasted on padding except
    in the one last block of each stream, which is padded rather than dropped: no token of the text
    is lost. Padding gets attention_mask 0 and label -100, so the model never attends to it nor is
    trained to predict it. The train stream is the training documents in order, the validation
    stream the held-out ones in order; split by block, the stream of all documents is cut and its
    blocks dealt."""
    block_size, pad_id = settings["block_size"], tokenizer.eos_token_id  # pad: any id, it is masked
    ends = np.cumsum(token_counts)
    starts = ends - np.array(token_counts)
    held = split["held_out"]
    if "validation_documents" in held:
        validation = set(held["validation_documents"])
        train = [number for number in range(len(ends)) if number not in validation]
        streams = [(name, [(starts[number], ends[number]) for number in numbers])
                   for name, numbers in (("train", train), ("validation", sorted(validation)))]
    else:
        streams = [("by block", [(0, ends[-1])])]
    validation_blocks = np.array(held.get("validation_blocks", []), dtype=np.int64)
    dtype = token_dtype(len(tokenizer))
    counts = {name: {"samples": 0, "tokens": 0, "padding_tokens": 0}
              for name in ("train", "validation")}
    writers = open_splits(partial, sample_features(block_size, dtype))
    for stream, ranges in streams:
        first = 0  # number of this stream's first block in the batch
        chunks = read_tokens(partial / TOKENS_FILE, ranges, dtype)
        for ids, lengths in cut_blocks(chunks, block_size, pad_id):
            numbers = np.arange(first, first + len(ids))
            first += len(ids)
            if stream == "by block":
                in_validation = np.isin(numbers, validation_blocks)
            else:
                in_validation = np.full(len(numbers), stream == "validation")
            for name, rows in (("train", ~in_validation), ("validation", in_validation)):
                if rows.any():
                    writers[name].write_table(samples_table(ids[rows], lengths[rows], dtype))
                    counts[name]["samples"] += int(rows.sum())
                    counts[name]["tokens"] += int(lengths[rows].sum())
                    counts[name]["padding_tokens"] += int((block_size - lengths[rows]).sum())
    close_splits(partial, writers, counts)
    (partial / TOKENS_FILE).unlink()
    return counts


def read_tokens(token_file, ranges, dtype, chunk_tokens=1 << 20):
    """The token ids of the given (start, end) ranges of token_file, in chunks of at most
    chunk_tokens; ranges that touch are read as one."""
    merged = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1][1] = end
        elif end > start:
            merged.append([start, end])
    with open(token_file, "rb") as tokens:
        for start, end in merged:
            tokens.seek(int(start) * np.dtype(dtype).itemsize)
            for chunk_start in range(int(start), int(end), chunk_tokens):
                yield np.fromfile(tokens, dtype, min(chunk_tokens, int(end) - chunk_start))


def cut_blocks(chunks, block_size, pad_id):
    """Blocks of exactly block_size tokens from a stream that comes in chunks, the last one padded.
    Yields (ids: a rows x block_size array, lengths: the real tokens in each row)."""
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


def sample_features(block_size, dtype):
    """The columns of a sample: ids in the smallest type that holds the vocabulary (uint16 for
    GPT-J), labels in int32 for their -100, the mask in int8. 7 bytes a token on disk where the
    dataset used to take 13 (int32 ids, int64 labels). The Trainer's default_data_collator gets
    Python ints from them and stacks them into int64 tensors, as before."""
    from datasets import Features, List, Value

    return Features({
        "input_ids": List(Value(np.dtype(dtype).name), length=block_size),
        "attention_mask": List(Value("int8"), length=block_size),
        "labels": List(Value("int32"), length=block_size),
    })


def samples_table(ids, lengths, dtype):
    import pyarrow as pa

    block_size = ids.shape[1]
    mask = np.arange(block_size) < lengths[:, None]
    columns = {"input_ids": ids.astype(dtype, copy=False), "attention_mask": mask.astype(np.int8),
               "labels": np.where(mask, ids.astype(np.int32), np.int32(-100))}
    return pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), block_size)
                     for name, values in columns.items()})


def open_splits(partial, features):
    """An Arrow writer for each split, writing into the dataset folder as `datasets` lays it out.

    datasets saves only a dataset that exists already, in memory or memory-mapped (and every byte of
    a memory-mapped copy counts against RAM while it is saved), so it lays out the folder for an
    empty dataset with these columns, and the samples stream into each split's one data file."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    empty = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # its bar would count the empty dataset's no samples
    try:
        datasets.DatasetDict(train=empty, validation=empty).save_to_disk(
            str(partial), num_shards={"train": 1, "validation": 1})
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    writers = {}
    for name in ("train", "validation"):
        [data_file] = json.loads((partial / name / "state.json").read_text())["_data_files"]
        path = partial / name / data_file["filename"]
        writers[name] = ArrowWriter(features=features, path=str(path))
    return writers


def close_splits(partial, writers, counts):
    from datasets import load_from_disk

    for writer in writers.values():
        writer.finalize()
        writer.close()
    saved = load_from_disk(str(partial))
    for name, count in counts.items():  # the layout is datasets': should a version change it, stop
        assert len(saved[name]) == count["samples"], f"{partial}/{name}: read back other samples"


def dataset_facts(settings, tokenizer, documents, skipped, token_counts, split, sample_counts):
    """The facts finetune.py checks before it loads the model, and a record of what went in."""
    return {
        "tokenizer": settings["tokenizer"],
        **artifacts.tokenizer_fingerprint(tokenizer),
        "block_size": settings["block_size"],
        "validation_share": settings["validation_share"],
        "seed": settings["seed"],
        "split": split["method"],
        **split["held_out"],  # validation_documents or validation_blocks: anyone can rebuild it
        "documents": len(documents),
        "tokens": sum(token_counts),
        "counts": sample_counts,
        "files": [{"path": name, "tokens": count}
                  for (name, _, _), count in zip(documents, token_counts)],
        "skipped_files": skipped,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def progress_bar(description, paths):
    """A bar in MB (with MB/s) and files, shown once a stage has taken WORK["progress_after_s"]."""
    from tqdm import tqdm

    total = sum(os.path.getsize(path) for path in paths)
    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, mininterval=1,
               delay=WORK["progress_after_s"], file=sys.stderr)
    bar.set_postfix_str(f"0/{len(paths)} files", refresh=False)
    return bar


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
    import finetune  # its TRAINING settings say what these samples will mean for training
    import plan

    train_samples = counts["train"]["samples"]
    print(plan.batch_plan(train_samples, finetune.TRAINING, plan.gpu_count(), facts["block_size"]))


if __name__ == "__main__":
    main()
