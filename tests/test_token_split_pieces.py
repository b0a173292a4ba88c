"""Files read and tokenized in pieces give exactly the tokens of each file tokenized whole."""

import json
import random
import re

import pytest
from datasets import load_from_disk
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import artifacts
import corpus
import token_split
from conftest import REPO, write_files
from test_token_split import PARAGRAPH, expected_tokens, unpadded

# Pieces of text where a tokenizer might join or split differently: contractions, runs and mixes of
# white space (also non-breaking and ideographic spaces, and \x1c, which Python calls white space
# and the tokenizer does not), punctuation, digits, CJK without spaces, emoji and a combining
# accent.
WORDS = ["the", "keeper's", "lamp", "'s", "(lit", "9:45)", "naïve", "café", "東京の灯台", "🙂",
         "e\u0301", "--", "x=1;", "'", "don't", "123", "4.5", "Ünïcödé", "\u00a0", "\u3000", "\x1c",
         "."]
SPACES = ["", " ", "  ", "\n", "\n\n", "\t", " \n", "\n ", "\n\t\t", "   \n  ", "\u00a0", " \u3000"]


def random_text(rng, length):
    return "".join(rng.choice(WORDS) + rng.choice(SPACES) for _ in range(length))


def cut_places(text):
    """Every place token_split may cut a text: before a space or line break that follows a
    non-space."""
    return [position for position in range(1, len(text))
            if text[position] in " \n" and not text[position - 1].isspace()]


def in_pieces(encoder, text, cuts):
    pieces = [text[start:end] for start, end in zip([0] + cuts, cuts + [len(text)])]
    return [token for encoding in encoder.encode_batch_fast(pieces, add_special_tokens=False)
            for token in encoding.ids]


def test_every_cut_place_keeps_the_tokens_of_the_whole_text(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encoder = tokenizer.backend_tokenizer
    rng, cut_count = random.Random(0), 0
    for _ in range(300):
        text = random_text(rng, rng.randrange(1, 60))
        whole = tokenizer(text, add_special_tokens=False)["input_ids"]
        places = cut_places(text)
        cut_count += len(places)
        assert in_pieces(encoder, text, places) == whole, repr(text)  # cut at all of them at once
        some = sorted(rng.sample(places, len(places) // 2))
        assert in_pieces(encoder, text, some) == whole, repr(text)  # or at some
    assert cut_count > 3000
    assert corpus.pieces_are_exact(encoder)


# Files that are cut into many pieces when a piece is 16 characters, and two that cannot be cut.
FILES = {
    "prose.txt": "Dear Anna,\nthe lamp is lit.\n\n  Indented, with\ttabs  and   spaces.\n" * 40,
    "one_line.txt": (PARAGRAPH * 30).strip(),  # no line break at all
    "crlf_bom.txt": "\ufeff" + "Windows line ends\r\nand a byte-order mark.\r\n" * 30,
    "straddle.txt": "abcdefghijklmno\r\npqr stu\r\n" * 10,  # reads of 16 bytes end inside \r\n
    "mixed.txt": random_text(random.Random(1), 400),
    "no_space.txt": "x" * 3000,  # nowhere to cut: one piece
    "cjk.txt": "東京の灯台守は夜明けに灯を消した。" * 60,  # no spaces or line breaks: one piece
}


@pytest.mark.parametrize("piece_chars, batch_chars", [(16, 64), (1000, 5000), (64 << 10, 2 << 20)])
def test_files_in_pieces_give_the_whole_files_tokens(tmp_path, tiny_model, configure, piece_chars,
                                                      batch_chars):
    write_files(tmp_path / "text", FILES)
    configure(token_split.SETTINGS, text_dir=str(tmp_path / "text"),
              dataset_dir=str(tmp_path / "dataset"), tokenizer=tiny_model, block_size=64,
              validation_share=0, seed=1)
    configure(corpus.WORK, piece_chars=piece_chars, batch_chars=batch_chars)
    token_split.main()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    names = sorted(FILES)
    whole = {name: expected_tokens(tokenizer, FILES[name]) for name in names}
    facts = json.loads((tmp_path / "dataset" / artifacts.DATASET_FACTS).read_text())
    assert [entry["path"] for entry in facts["files"]] == names
    assert [entry["tokens"] for entry in facts["files"]] == [len(whole[name]) for name in names]
    dataset = load_from_disk(str(tmp_path / "dataset"))
    # Nothing is held out (validation_share 0): the train stream is every file's tokens in order.
    assert unpadded(dataset["train"]) == [token for name in names for token in whole[name]]

    # The files really were cut (except the two without a place to cut), and the pieces join up
    # again.
    for name in names:
        path = tmp_path / "text" / name
        blocks = corpus.read_text(path, "text", piece_chars)
        pieces = list(corpus.cut_pieces(blocks, piece_chars))
        text = FILES[name].lstrip("\ufeff").replace("\r\n", "\n")
        assert "".join(piece for piece, _, _ in pieces) == text
        assert [last for _, last, _ in pieces] == [False] * (len(pieces) - 1) + [True]
        assert sum(read for _, _, read in pieces) == path.stat().st_size
        if name in ("no_space.txt", "cjk.txt") or len(FILES[name].encode()) <= piece_chars:
            assert len(pieces) == 1
        else:
            assert len(pieces) > len(FILES[name].encode()) // piece_chars // 2, name


def test_a_tokenizer_that_cannot_be_cut_gets_each_file_whole(tmp_path, configure, capsys):
    # A byte-level BPE that puts a space before every text it is given: a piece would get one too.
    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    demo_files = sorted(str(path) for path in (REPO / "demo" / "text").rglob("*.txt"))
    bpe.train(demo_files, vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False)
    prefixed = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    prefixed.save_pretrained(tmp_path / "prefix")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "prefix")
    assert not corpus.pieces_are_exact(tokenizer.backend_tokenizer)

    files = {name: FILES[name] for name in ("prose.txt", "one_line.txt", "mixed.txt")}
    write_files(tmp_path / "text", files)
    configure(token_split.SETTINGS, text_dir=str(tmp_path / "text"),
              dataset_dir=str(tmp_path / "dataset"), tokenizer=str(tmp_path / "prefix"),
              block_size=64, validation_share=0, seed=1)
    configure(corpus.WORK, piece_chars=16, batch_chars=64)
    token_split.main()
    warning = "gives other tokens for a text in pieces than for it whole, so each file is tokenized"
    assert warning in capsys.readouterr().err
    dataset = load_from_disk(str(tmp_path / "dataset"))
    assert unpadded(dataset["train"]) == [token for name in sorted(files)
                                          for token in expected_tokens(tokenizer, files[name])]


def test_progress_bar_counts_megabytes_and_files(tmp_path, tiny_model, configure, capsys):
    write_files(tmp_path / "text", FILES)
    configure(token_split.SETTINGS, text_dir=str(tmp_path / "text"),
              dataset_dir=str(tmp_path / "dataset"), tokenizer=tiny_model, block_size=64)
    configure(corpus.WORK, progress_after_s=0, piece_chars=1000, batch_chars=5000)
    token_split.main()
    bars = capsys.readouterr().err.replace("\r", "\n")
    size = sum(path.stat().st_size for path in (tmp_path / "text").iterdir()) / 1000
    for stage in ("checking", "tokenizing"):  # the last state of each bar: all of it, with a rate
        final = rf"{stage}: 100%.*\| {size:.1f}k/{size:.1f}k \[.*[kM]?B/s, 7/7 files\]"
        assert re.search(final, bars), bars
