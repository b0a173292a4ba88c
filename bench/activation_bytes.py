"""Bytes a token that one GPT-J-6B block keeps for its backward pass: what keeping activations in host RAM
instead of recomputing them would take (issue #28). Runs on a CPU or a GPU, one block at full width.

    python bench/activation_bytes.py [SEQ_LEN]   # 2048 unless given; a record goes to bench/results.json

Counts what autograd saves during the forward of one GPT-J block (torch.autograd.graph.saved_tensors_hooks),
each storage once and the weights apart, in the model's 16-bit dtype, with the product's one-kernel GELU and
the attention Transformers picks (SDPA: no seq x seq matrix is kept). Under activation checkpointing a block
keeps only its input (4,096 x 2 bytes a token). The tensors saved depend on the kernels: measured where it runs.
"""

import datetime
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MICRO_BATCHES = [1, 8, 11]  # samples a micro-step: the product's ram-optimizer runs 8 x 2 and 11 x 8 at 24 GiB
FREE_BESIDE_RAM_OPTIMIZER_GIB = {128: 128 - 111.6 - 6, 192: 192 - 111.6 - 6, 256: 256 - 111.6 - 6}  # 6: OS, CUDA


def main(seq_len=2048):
    import torch
    from transformers import GPTJConfig, GPTJModel

    import memory_savers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    config = memory_savers.one_kernel_gelu(GPTJConfig(n_layer=1, vocab_size=8, use_cache=False))
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTJModel(config).to(dtype).train()  # one block with the embeddings' plumbing around it
    print(f"one GPT-J-6B block on {device}, {dtype}, attention: {model.config._attn_implementation}", flush=True)
    block, weights = model.h[0], {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    hidden = torch.randn(1, seq_len, config.n_embd, dtype=dtype, device=device, requires_grad=True)
    position_ids = torch.arange(seq_len, device=device)[None]
    position_embeddings = model.rotary_emb(hidden, position_ids=position_ids)

    def saved_bytes(forward):
        storages, shapes = {}, []

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:  # the block's input counts: its layer norm keeps it
                storages[storage.data_ptr()] = storage.nbytes()
                shapes.append(f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}")
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward()
        output.float().sum().backward()  # the saved tensors are what the backward reads: it must run
        return sum(storages.values()), shapes

    def plain():
        return block(hidden, position_ids=position_ids, position_embeddings=position_embeddings)

    kept, shapes = saved_bytes(plain)
    per_token = kept / seq_len
    rows = {}
    for batch in MICRO_BATCHES:
        per_layer_gib = per_token * batch * seq_len / 2**30
        rows[batch] = {"one_layer_gib": round(per_layer_gib, 2), "all_28_layers_gib": round(28 * per_layer_gib, 1),
                       "layers_beside_ram_optimizer": {f"{host} GiB host": min(28, int(free // per_layer_gib))
                                                       for host, free in FREE_BESIDE_RAM_OPTIMIZER_GIB.items()}}
        print(f"micro-batch {batch} x {seq_len}: {per_layer_gib:.2f} GiB a layer, {28 * per_layer_gib:.1f} GiB "
              f"for GPT-J's 28; layers that fit beside ram-optimizer's 111.6 GiB: "
              f"{rows[batch]['layers_beside_ram_optimizer']}")
    print(f"saved for backward: {per_token / 1024:.1f} KiB a token a layer ({len(shapes)} tensors: "
          f"{', '.join(shapes)})", flush=True)
    import deepspeed
    import transformers

    record = {
        "point": "activation-bytes", "date": datetime.date.today().isoformat(), "seq_len": seq_len,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": str(dtype),
        "attention": model.config._attn_implementation,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "deepspeed": deepspeed.__version__, "python": sys.version.split()[0]},
        "saved_bytes_per_token_per_layer": round(per_token), "saved_tensors": shapes,
        "micro_batches": rows, "assumed_free_gib": FREE_BESIDE_RAM_OPTIMIZER_GIB,
        "command": f"python bench/activation_bytes.py {seq_len}",
    }
    results = Path(os.environ.get("BENCH_RESULTS", REPO / "bench" / "results.json"))
    records = json.loads(results.read_text()) if results.exists() else []
    results.write_text(json.dumps(records + [record], indent=1) + "\n")
    print("BENCH_RECORD " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
