"""token_split.py on real files with the tiny GPT-J tokenizer: exact token accounting, splits, bad input."""

import json

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

import artifacts
import token_split
from conftest import write_files

# Several files, a nested folder, CRLF and old-Mac line ends, a byte-order mark, non-ASCII text, an
# empty and a blank file. Eight documents of similar size, so that whole documents can be held out.
PARAGRAPH = "The keeper lit the lamp at dusk and trimmed the wick at dawn. "
CORPUS = {
    "a.txt": PARAGRAPH * 6,
    "b.txt": "Line one\r\nLine two\r\n" + PARAGRAPH * 5,
    "c.txt": "\ufeffStarts with a byte-order mark. " + PARAGRAPH * 5,
    "d.txt": "Naïve café, Grüße, 東京, emoji 🙂. " + PARAGRAPH * 5,
    "e.txt": "",
    "f.txt": "  \n\t \n",
    "nested/deeper/g.txt": "Old Mac\rline ends. " + PARAGRAPH * 5,
    "nested/h.txt": PARAGRAPH * 6,
    "nested/i.txt": "Last but one. " + PARAGRAPH * 5,
    "z.txt": "Final document. " + PARAGRAPH * 5,
    "notes.md": "not a .txt file, never read",
}


@pytest.fixture
def split(tmp_path, tiny_model, configure):
    """Point token_split at tmp_path/text and tmp_path/dataset; return a function that runs it."""
    def run(files=CORPUS, **settings):
        write_files(tmp_path / "text", files)
        configure(token_split.SETTINGS, text_dir=str(tmp_path / "text"), dataset_dir=str(tmp_path / "dataset"),
                  tokenizer=tiny_model, block_size=64, validation_share=0.2, seed=1)
        configure(token_split.SETTINGS, **settings)
        token_split.main()
        dataset = load_from_disk(str(tmp_path / "dataset"))
        metadata = json.loads((tmp_path / "dataset" / artifacts.DATASET_FACTS).read_text())
        return dataset, metadata
    return run


def expected_tokens(tokenizer, raw):
    """What a document should become, computed independently: decode, drop the BOM, \\n line ends, EOS."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def unpadded(split):
    """The samples of a split joined back into one stream, padding removed; checks labels and masks."""
    stream = []
    for ids, mask, labels in zip(split["input_ids"], split["attention_mask"], split["labels"]):
        assert len(ids) == len(mask) == len(labels)
        kept = [token for token, keep in zip(ids, mask) if keep]
        assert labels == [token if keep else -100 for token, keep in zip(ids, mask)]
        assert mask == [1] * len(kept) + [0] * (len(ids) - len(kept))  # padding only at the end
        stream += kept
    return stream


def test_every_token_kept_in_order_with_eos_between_documents(split, tiny_model):
    dataset, metadata = split()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    names = [entry["path"] for entry in metadata["files"]]
    assert names == ["a.txt", "b.txt", "c.txt", "d.txt", "nested/deeper/g.txt", "nested/h.txt",
                     "nested/i.txt", "z.txt"]  # sorted, recursive, .txt only, empty ones skipped
    assert metadata["skipped_files"] == ["e.txt", "f.txt"]
    documents = [expected_tokens(tokenizer, CORPUS[name]) for name in names]
    assert metadata["split"].startswith("by document")
    held_out = metadata["validation_documents"]
    assert held_out, "validation must not be empty"
    train = [t for i, tokens in enumerate(documents) if i not in held_out for t in tokens]
    validation = [t for i in held_out for t in documents[i]]
    assert unpadded(dataset["train"]) == train
    assert unpadded(dataset["validation"]) == validation
    assert all(len(ids) == 64 for name in ("train", "validation") for ids in dataset[name]["input_ids"])
    assert metadata["tokens"] == len(train) + len(validation)
    assert metadata["counts"]["train"]["samples"] == len(dataset["train"])
    # The text really is what we think: the BOM is gone, non-ASCII survives, CRLF became \n.
    decoded = tokenizer.decode(train + validation)
    assert "\ufeff" not in decoded and "\r" not in decoded
    assert "Naïve café, Grüße, 東京, emoji 🙂." in decoded and "Line one\nLine two\n" in decoded


def test_single_document_is_split_by_block_and_reproducibly(split, tiny_model):
    one_file = {"only.txt": "Single long document. " + PARAGRAPH * 40}
    dataset, metadata = split(one_file)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert metadata["split"].startswith("by block")
    validation_blocks = metadata["validation_blocks"]
    assert len(dataset["validation"]) == len(validation_blocks) >= 1
    # Put the held-out blocks back where they were: the stream is whole again.
    train_rows, validation_rows = iter(dataset["train"]), iter(dataset["validation"])
    total = len(dataset["train"]) + len(dataset["validation"])
    blocks = [next(validation_rows) if i in validation_blocks else next(train_rows) for i in range(total)]
    joined = unpadded({key: [row[key] for row in blocks] for key in ("input_ids", "attention_mask", "labels")})
    assert joined == expected_tokens(tokenizer, one_file["only.txt"])

    again, again_metadata = split(one_file)
    assert again_metadata["validation_blocks"] == validation_blocks
    assert list(again["validation"]["input_ids"]) == list(dataset["validation"]["input_ids"])
    other_seeds = [split(one_file, seed=seed)[1]["validation_blocks"] for seed in (2, 3, 4)]
    assert any(blocks != validation_blocks for blocks in other_seeds)  # the seed does choose


def test_two_blocks_always_give_validation(split, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = PARAGRAPH * 6
    assert 64 < len(expected_tokens(tokenizer, text)) <= 128  # between one and two blocks
    dataset, metadata = split({"short.txt": text})
    assert len(dataset["validation"]) == 1 and len(dataset["train"]) == 1


@pytest.mark.parametrize("files, message", [
    ({"a.md": "no text files"}, "no .txt files found"),
    ({"a.txt": PARAGRAPH * 5, "bad.txt": b"caf\xe9 au lait"}, "bad.txt' is not valid UTF-8 (byte offset 3"),
    ({"a.txt": PARAGRAPH * 5, "image.txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, "image.txt' looks binary"),
    ({"a.txt": "", "b.txt": "\n"}, "is empty; nothing to train on"),
    ({"a.txt": "Too short."}, "fewer than one block of 64"),
])
def test_bad_input_names_the_problem_and_keeps_the_old_dataset(split, tmp_path, files, message, capsys):
    split({"good.txt": PARAGRAPH * 20})  # a complete dataset from an earlier run
    before = json.loads((tmp_path / "dataset" / artifacts.DATASET_FACTS).read_text())
    for path in (tmp_path / "text").iterdir():
        path.unlink() if path.is_file() else None
    with pytest.raises(SystemExit) as failure:
        split(files)
    assert message in str(failure.value)
    after = json.loads((tmp_path / "dataset" / artifacts.DATASET_FACTS).read_text())
    assert after == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "text"]  # nothing half-written beside it


def test_missing_text_folder(tmp_path, configure):
    configure(token_split.SETTINGS, text_dir=str(tmp_path / "nowhere"), dataset_dir=str(tmp_path / "dataset"))
    with pytest.raises(SystemExit, match="text folder .*nowhere' does not exist"):
        token_split.main()
    assert not (tmp_path / "dataset").exists()


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path):
    # A .partial folder is what an interrupted save leaves; it is never mistaken for a dataset.
    (tmp_path / "dataset.partial").mkdir()
    with pytest.raises(SystemExit, match="does not exist"):
        artifacts.read_dataset_facts(tmp_path / "dataset")
    (tmp_path / "dataset").mkdir()  # a folder without its metadata file: never completed
    with pytest.raises(SystemExit, match="incomplete"):
        artifacts.read_dataset_facts(tmp_path / "dataset")


def test_samples_are_small_on_disk_and_load_as_the_trainer_expects(split, tiny_model):
    """ids in uint16, the mask in int8, labels (with -100) in int32 on disk; finetune.py loads them
    with load_from_disk and the Trainer's default_data_collator stacks them into int64 tensors."""
    import torch
    from transformers import default_data_collator

    dataset, metadata = split()
    features = dataset["train"].features
    assert [features[name].feature.dtype for name in ("input_ids", "attention_mask", "labels")] == \
        ["uint16", "int8", "int32"]
    rows = [dataset["validation"][index] for index in range(len(dataset["validation"]))]
    batch = default_data_collator(rows)
    assert {name: tensor.dtype for name, tensor in batch.items()} == {
        "input_ids": torch.int64, "attention_mask": torch.int64, "labels": torch.int64}
    assert batch["labels"].tolist() == [row["labels"] for row in rows]
    assert (batch["labels"] == -100).sum() == metadata["counts"]["validation"]["padding_tokens"]


def test_one_block_has_no_validation_and_says_so(split, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = PARAGRAPH * 3
    dataset, metadata = split({"one.txt": text}, block_size=len(expected_tokens(tokenizer, text)))
    assert metadata["split"] == ("none: the corpus fills only one block, so there is no validation "
                                 "data (add text for one)")
    assert len(dataset["train"]) == 1 and len(dataset["validation"]) == 0
    assert metadata["counts"]["train"]["padding_tokens"] == 0
