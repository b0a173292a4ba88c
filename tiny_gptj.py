"""A tiny GPT-J and its tokenizer, built locally: what the demo and the tests fine-tune instead of GPT-J-6B.

    python tiny_gptj.py demo/text demo/work/tiny-gptj

Same architecture and code path as EleutherAI/gpt-j-6B (GPTJForCausalLM, byte-level BPE with
<|endoftext|>), but 2 layers of width 64 (~0.4 M parameters) with random weights, so it trains in
seconds on a CPU and needs no download.
"""

import sys
from pathlib import Path

TINY = {
    "vocab_size": 2048,  # BPE merges learned from the given text; GPT-J's has 50,400 entries
    "n_layer": 2,  # GPT-J-6B: 28
    "n_embd": 64,  # GPT-J-6B: 4096
    "n_head": 4,  # GPT-J-6B: 16
    "rotary_dim": 8,  # rotary position dimensions per head (head width is 16 here); GPT-J-6B: 64 of 256
    "n_positions": 256,  # context length in tokens; GPT-J-6B: 2048
    "seed": 0,  # initial weights
}


def build(text_dir, out_dir, settings=TINY):
    """Train a byte-level BPE tokenizer on text_dir/**/*.txt and save it with a random tiny GPT-J."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

    files = sorted(str(path) for path in Path(text_dir).rglob("*.txt"))
    bpe = ByteLevelBPETokenizer()
    bpe.train(files, vocab_size=settings["vocab_size"], special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",  # as GPT-J's
        model_max_length=settings["n_positions"],
    )
    torch.manual_seed(settings["seed"])
    config = GPTJConfig(
        vocab_size=len(tokenizer),
        n_positions=settings["n_positions"],
        n_embd=settings["n_embd"],
        n_layer=settings["n_layer"],
        n_head=settings["n_head"],
        rotary_dim=settings["rotary_dim"],
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPTJForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(f"built {build(sys.argv[1], sys.argv[2])}")
