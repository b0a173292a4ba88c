"""FP8 matrix multiplies for full fine-tuning (finetune.py's FP8): each transformer block's Linear layers
multiply in FP8 through torchao, their weights, gradients and optimizer state stay as they were.

torchao scales each tensor to FP8 before a matmul; run eagerly, those casts cost more time and memory than
FP8 saves (bench/RESULTS.md: out of GPU memory at a batch bf16 holds), so each block's attention and MLP
are compiled (torch.compile), which fuses the casts. ZeRO-3 then fetches a block's weights in one hook
(a leaf module), so that no ZeRO-3 hook breaks a compiled graph.
"""

import torch


def blocks_in_fp8(model):
    """The model, its blocks' Linear layers in FP8 (embeddings and the output layer as they were) and
    each block's attention and MLP compiled. GPT-J's blocks are model.transformer.h (as GPT-2's)."""
    from deepspeed.utils import set_z3_leaf_modules
    from torchao.float8 import convert_to_float8_training  # imported here: it prints notes on import

    blocks = model.transformer.h
    # FP8 matmuls need dimensions that are multiples of 16: GPT-J's blocks have them, its vocabulary not.
    convert_to_float8_training(blocks, module_filter_fn=lambda module, name: True)
    set_z3_leaf_modules(model, [type(blocks[0])])  # ZeRO-3: a block's weights in one fetch
    # Dynamo keeps each ZeRO-3 parameter's id as a constant: one graph per block, and training and
    # evaluation each have their own, past its default limit of 8 (then it would run the rest eagerly).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
    for block in blocks:  # gradient checkpointing and ZeRO-3 stay outside the graphs, eager
        block.attn.forward, block.mlp.forward = torch.compile(block.attn.forward), torch.compile(block.mlp.forward)
    return model
