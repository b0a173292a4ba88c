"""Run by tests/test_finetune.py in a process of its own: the overflow verdicts of a real ZeRO-3 optimizer.

    DS_ACCELERATOR=cpu python tests/zero3_overflow.py    # prints {"original": {...}, "lean": {...}, ...}

A tiny GPT-J goes through deepspeed.initialize with ZeRO-3 and both offloads (the set-up "ram" on CPU); its
flat gradient buffer is then filled with crafted values, finite or holding one +inf, -inf or nan, in fp32
and in FP16, and has_overflow() asked, before and after memory_savers.lean_zero3_overflow_check().
"""

import json
import math
import os
import socket

import deepspeed
import torch
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from transformers import GPTJConfig, GPTJForCausalLM

import memory_savers

CASES = {"finite": None, "+inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def verdicts(zero):
    found = {}
    for dtype, prefix in ((torch.float32, ""), (torch.float16, "fp16 ")):
        for name, value in CASES.items():
            buffer = torch.randn(zero.grad_partitions_flat_buffer.numel(), generator=torch.Generator().manual_seed(0))
            buffer = buffer.to(dtype)
            if value is not None:
                buffer[buffer.numel() // 2] = value
            zero.grad_partitions_flat_buffer = buffer
            found[prefix + name] = zero.has_overflow(partition_gradients=True)
    return found


def main():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed()
    model = GPTJForCausalLM(GPTJConfig(n_layer=1, n_embd=32, n_head=2, rotary_dim=4, vocab_size=64, n_positions=32))
    config = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                    "offload_optimizer": {"device": "cpu"}},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    original = verdicts(engine.optimizer)
    memory_savers.lean_zero3_overflow_check()
    lean = verdicts(engine.optimizer)
    patched = getattr(DeepSpeedZeroOptimizer_Stage3.has_overflow, "lean", False)
    print(json.dumps({"original": original, "lean": lean, "patched": patched}))


if __name__ == "__main__":
    main()
