"""A CPU proxy of product_run.py's optimizer-state runs (issue #28): a GPT-J of 4 layers x 256 (5.3 M
parameters) with random weights and a BPE of 4,096 on 0.4 MB of this machine's Python sources, in
product_run.py's folders (BENCH_WORK), cut into blocks of 128. Then, on any CPU:

    export BENCH_WORK=/tmp/proxy/work BENCH_RESULTS=/tmp/proxy/results.json DS_ACCELERATOR=cpu
    python bench/state_proxy.py && python bench/product_run.py state exact 24 2   # then bf16-master, ...

(~4 min a run on 2 cores; the records call the model GPT-J-6B: bench/state_cpu_proxy.json has them relabelled.)
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/proxy/work"))


def main(megabytes=0.4):
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

    import token_split

    text, size = WORK / "text", 0
    for path in sorted(Path(sys.base_prefix, "lib").rglob("*.py")):
        try:
            content = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if content.strip() and size < megabytes * 1e6:
            target = text / path.relative_to(sys.base_prefix).with_suffix(".txt")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
            size += len(content.encode())
    bpe = ByteLevelBPETokenizer()
    bpe.train(sorted(str(p) for p in text.rglob("*.txt")), vocab_size=4096, special_tokens=["<|endoftext|>"],
              show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=2048)
    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(n_layer=4, n_embd=256, n_head=4, rotary_dim=64, vocab_size=4096,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {size:,} bytes of text", flush=True)
    folder = WORK / "gptj-6b-safetensors"  # where product_run.py looks for the model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    token_split.SETTINGS.update(text_dir=str(text), dataset_dir=str(WORK / "dataset"), tokenizer=str(folder),
                                block_size=128)
    token_split.main()


if __name__ == "__main__":
    main()
