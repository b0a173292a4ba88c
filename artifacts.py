"""The folders the scripts hand each other: the dataset and its facts, out/ and its log, each written whole.

token_split.py writes data/tokenized/ with a facts file; finetune.py reads and checks those facts before it
loads anything, and writes out/ with finetune_log.json. Both write beside the final folder (".partial")
and swap it in with renames, so a folder that exists is always complete.
"""

import json
import math
import os
import shutil
from pathlib import Path

DATASET_FACTS = "token_split.json"  # written last into the dataset folder: its presence marks it complete
TRAINING_LOG = "finetune_log.json"  # in out/: validation loss before and after, and the Trainer's log
PROBE_TEXT = "Hello world, naïve café 123\n"


def partial_path(target):
    """Where a folder is written before it replaces target."""
    return Path(str(Path(target)) + ".partial")


def swap_in(partial, target):
    """Put a completely written folder in place of target with renames (atomic on one disk): at every
    moment target is either the old complete folder or the new one."""
    partial, target = Path(partial), Path(target)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)


def tokenizer_fingerprint(tokenizer):
    """Size, EOS and a short text's ids: two tokenizers that agree on these are taken to be the same."""
    return {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer_probe": tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"],
    }


def write_dataset_facts(folder, facts):
    (Path(folder) / DATASET_FACTS).write_text(json.dumps(facts, indent=1) + "\n")


def read_dataset_facts(dataset_dir):
    """The facts token_split.py saved; a clear error if the folder is missing or was never completed."""
    path = Path(dataset_dir) / DATASET_FACTS
    if not path.is_file():
        state = "is incomplete (an earlier token_split.py run stopped half-way)" if Path(dataset_dir).exists() \
            else "does not exist"
        raise SystemExit(f"the dataset folder '{dataset_dir}' {state}. Run `python token_split.py` first.")
    return json.loads(path.read_text())


def check_dataset(facts, tokenizer, model_name, context):
    """Stop before loading the model if the dataset was made for another tokenizer or is too long for it."""
    if tokenizer_fingerprint(tokenizer) != {key: facts[key] for key in ("vocab_size", "eos_token_id", "tokenizer_probe")}:
        raise SystemExit(
            f"finetune.py: the dataset was tokenized with '{facts['tokenizer']}' ({facts['vocab_size']} tokens), "
            f"which is not the tokenizer of '{model_name}' ({len(tokenizer)} tokens). Set token_split.py's "
            f"tokenizer to '{model_name}' and re-run `python token_split.py`.")
    if facts["block_size"] > context:
        raise SystemExit(f"finetune.py: the dataset's blocks of {facts['block_size']} tokens are longer than the "
                         f"model's context of {context}. Lower token_split.py's block_size and re-run it.")


def validation_summary(log_history):
    """Validation loss and perplexity before and after training, from the Trainer's log."""
    losses = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    if len(losses) < 2:
        return {}
    return {"validation_loss_before": losses[0], "validation_loss_after": losses[-1],
            "validation_perplexity_before": math.exp(losses[0]), "validation_perplexity_after": math.exp(losses[-1])}


def write_training_log(folder, log_history, facts, **extra):
    """out/finetune_log.json: what was trained on, the validation summary and the Trainer's whole log.
    Returns the summary in a sentence."""
    summary = validation_summary(log_history)
    dataset = {key: facts[key] for key in ("tokenizer", "block_size", "tokens", "counts", "created")}
    log = {**summary, **extra, "dataset": dataset, "log_history": log_history}
    (Path(folder) / TRAINING_LOG).write_text(json.dumps(log, indent=1) + "\n")
    if not summary:
        return "No validation loss was measured."
    return (f"Validation loss {summary['validation_loss_before']:.4f} -> {summary['validation_loss_after']:.4f}, "
            f"perplexity {summary['validation_perplexity_before']:.2f} -> "
            f"{summary['validation_perplexity_after']:.2f}.")
