"""A CPU proxy of product_run.py's optimizer-state runs (issue #28): a GPT-J of 4 layers x 256 (5.3 M
parameters) with random weights and a BPE of 4,096 on 0.4 MB of this machine's Python sources, in
product_run.py's folders (BENCH_WORK), cut into blocks of 128. Then, on any CPU:

    export BENCH_WORK=/tmp/proxy/work BENCH_RESULTS=/tmp/proxy/results.json DS_ACCELERATOR=cpu
    python bench/state_proxy.py && python bench/product_run.py state exact 24 2   # then bf16-master, ...

(~4 min a run on 2 cores; the records call the model GPT-J-6B: bench/state_cpu_proxy.json has them relabelled.)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # product_run.py, beside this file


def main(megabytes=0.4):
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    from product_run import WORK, local_bpe, python_sources  # BENCH_WORK's folders, as the runs read them

    import token_split  # the repository is on sys.path once product_run is imported

    text = WORK / "text"
    tokenizer = local_bpe(python_sources(text, megabytes), vocab_size=4096)
    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(n_layer=4, n_embd=256, n_head=4, rotary_dim=64, vocab_size=4096,
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    folder = WORK / "gptj-6b-safetensors"  # where product_run.py looks for the model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    token_split.SETTINGS.update(text_dir=str(text), dataset_dir=str(WORK / "dataset"), tokenizer=str(folder),
                                block_size=128)
    token_split.main()


if __name__ == "__main__":
    main()
