"""The user's text files: found, checked before the long work, read back as exact UTF-8 pieces.

token_split.py calls find_text_files, check_text_files and piece_batches, in that order. Every error
names the file and the fix; memory stays bounded whatever the size of one file.
"""

import codecs
import os
import re
import sys
from pathlib import Path

# How the work is done, not what it makes: nothing here changes the dataset (bench/token_bench.py).
WORK = {
    "piece_chars": 64 * 1024,  # text per tokenizer input; a longer file is cut into such pieces
    "batch_chars": 2 * 1024 * 1024,  # text per tokenizer call, spread over all cores (~0.3 GB RAM)
    "read_bytes": 1024 * 1024,  # bytes per read while every file is checked before the long work
    "progress_after_s": 2,  # a progress bar (MB, MB/s, files) shows once a stage takes this long
}


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
    the file and the fix). Returns the documents [(name, path)] and the names skipped.

    This is a first pass, so each file is read twice: reading alone runs at hundreds of MB/s,
    tokenizing at ~5 MB/s (bench/token_bench.py), so a bad file found here costs seconds where found
    while tokenizing it could cost the whole run first; and an empty file is known to be skipped
    before the tokenizer is loaded, which may download it."""
    documents, skipped = [], []
    progress = progress_bar("checking", files)
    for path in files:
        name, has_text = path.relative_to(text_dir).as_posix(), False
        for text, read in read_text(path, text_dir, WORK["read_bytes"]):
            has_text = has_text or (text != "" and not text.isspace())
            progress.update(read)
        done = len(documents) + len(skipped) + 1
        progress.set_postfix_str(f"{done}/{len(files)} files", refresh=False)
        if not has_text:
            print(f"warning: skipping '{path}': it is empty or holds only white space",
                  file=sys.stderr)
            skipped.append(name)
            continue
        documents.append((name, path))
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


def piece_batches(documents, text_dir, tokenizer):
    """Every document's text, in order, as batches of about WORK["batch_chars"] for one tokenizer
    call: lists of (document number, text, whether it is the document's last piece). A progress
    bar (MB, files) moves as each batch is done.

    A file is cut into pieces of about WORK["piece_chars"] that give exactly its tokens
    (cut_pieces), unless this tokenizer gives other tokens for a text in pieces (pieces_are_exact):
    then each file is one piece."""
    piece_chars = WORK["piece_chars"]
    if not pieces_are_exact(tokenizer.backend_tokenizer):
        piece_chars = None
        print(f"warning: the tokenizer '{tokenizer.name_or_path}' gives other tokens for a text in "
              f"pieces than for it whole, so each file is tokenized whole: memory grows with the "
              f"largest file.", file=sys.stderr)
    progress = progress_bar("tokenizing", [path for _, path in documents])
    batch, batch_chars, batch_read = [], 0, 0
    for number, (_, path) in enumerate(documents):
        blocks = read_text(path, text_dir, piece_chars or WORK["read_bytes"])
        for text, last, read in cut_pieces(blocks, piece_chars):
            batch.append((number, text, last))
            batch_chars, batch_read = batch_chars + len(text), batch_read + read
            if batch_chars >= WORK["batch_chars"] or (last and number == len(documents) - 1):
                yield batch
                progress.set_postfix_str(f"{number + last}/{len(documents)} files", refresh=False)
                progress.update(batch_read)  # shows the files done too
                batch, batch_chars, batch_read = [], 0, 0
    progress.close()


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


def progress_bar(description, paths):
    """A bar in MB (with MB/s) and files, shown once a stage has taken WORK["progress_after_s"]."""
    from tqdm import tqdm

    total = sum(os.path.getsize(path) for path in paths)
    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, mininterval=1,
               delay=WORK["progress_after_s"], file=sys.stderr)
    bar.set_postfix_str(f"0/{len(paths)} files", refresh=False)
    return bar
