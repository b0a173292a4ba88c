"""Less memory for the same numbers: the GPU's per sample, the host's per step.

GPU: the causal-LM loss in chunks and GELU in one kernel took a sample of 2048 tokens from ~1,660 to
~737 MiB (bench/RESULTS.md): 26 samples instead of 10 fit a 24 GiB card. Host: ZeRO-3's overflow
check without copies of the gradients, and the pinned memory ZeRO-3 leaves cached handed back.
"""

import gc
import os

import torch
from transformers import TrainerCallback


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """The Trainer's causal-LM loss (each token predicts the next; labels of -100 are skipped; a sum
    over the tokens of the whole accumulated batch divided by num_items_in_batch, else the mean),
    computed without holding fp32 copies of all logits. The model's own loss converts every logit to
    fp32 and keeps its log-softmax, and backward adds two more fp32 copies: with GPT-J's
    50,400-token vocabulary that is ~1.2 GB a sample of 2048 tokens. Here they exist for one chunk
    of tokens at a time."""
    # the next token is each one's label
    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    logits = outputs.logits.flatten(0, 1)
    total = ChunkedCrossEntropy.apply(logits, labels.flatten().to(logits.device))
    if num_items_in_batch is None:
        return total / (labels != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits (tokens x vocabulary, FP16 or fp32) against labels, a chunk of
    tokens at a time in fp32. Forward keeps only the logits; backward recomputes each chunk and
    writes its gradient over it, since nothing needs the logits once the loss is known (one
    logits-sized tensor instead of two). Same values as F.cross_entropy on fp32 logits."""

    @staticmethod
    def forward(context, logits, labels, chunk_tokens=1024):
        context.save_for_backward(logits, labels)
        context.chunk_tokens = chunk_tokens
        return sum(torch.nn.functional.cross_entropy(rows.float(), targets, ignore_index=-100,
                                                     reduction="sum")
                   for rows, targets in zip(logits.split(chunk_tokens), labels.split(chunk_tokens)))

    @staticmethod
    def backward(context, grad_total):
        logits, labels = context.saved_tensors
        for rows, targets in zip(logits.split(context.chunk_tokens),
                                 labels.split(context.chunk_tokens)):
            with torch.enable_grad():
                rows32 = rows.detach().float().requires_grad_()
                loss = torch.nn.functional.cross_entropy(rows32, targets, ignore_index=-100,
                                                         reduction="sum")
                rows_grad = torch.autograd.grad(loss, rows32, grad_total)[0]
            rows.copy_(rows_grad)  # the gradient replaces the logits
        return logits, None, None


def one_kernel_gelu(config):
    """GPT-J's "gelu_new" is the tanh approximation of GELU written as eight tensor operations, four
    of whose results are kept for backward: ~256 MiB a sample in every layer being recomputed.
    PyTorch's gelu(approximate="tanh") is the same function in one operation that keeps only its
    input. out/config.json then says "gelu_pytorch_tanh", which every transformers version loads."""
    if getattr(config, "activation_function", None) == "gelu_new":
        config.activation_function = "gelu_pytorch_tanh"
    return config


def install():
    """The savers that act on their own: the CUDA allocator grows its segments instead of leaving
    gaps it cannot use (more samples fit a card, bench/RESULTS.md), and ZeRO-3's lean overflow
    check."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    lean_zero3_overflow_check()


def lean_zero3_overflow_check():
    """Less host RAM at every optimizer step. With FP16, DeepSpeed 0.19.8's ZeRO-3 tests the whole
    flat gradient buffer for inf/nan with torch.isinf and torch.isnan, which allocate an abs copy
    and two masks of it: ~17 GiB for GPT-J, in host RAM when the optimizer is offloaded. DeepSpeed's
    own has_inf_or_nan gives the same verdict from two scalars (the buffer's amax and amin).
    Replaced for that version only: another version keeps its own check."""
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import has_inf_or_nan
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    if deepspeed.__version__ != "0.19.8" or getattr(Stage3.has_overflow, "lean", False):
        return
    original = Stage3.has_overflow

    def has_overflow(self, partition_gradients=True):  # stage3.py's; has_inf_or_nan for isinf/isnan
        if not partition_gradients:
            return original(self, partition_gradients)
        accelerator = get_accelerator()
        with accelerator.stream(self.reduce_and_partition_stream):
            self.inf_or_nan_tracker.logical_or_(has_inf_or_nan(self.grad_partitions_flat_buffer))
            overflow = (self.inf_or_nan_tracker.clone().to(accelerator.current_device_name())
                        .to(torch.uint8))
            self.inf_or_nan_tracker.zero_()
        if not accelerator.resolves_data_dependency():
            accelerator.default_stream().wait_stream(self.reduce_and_partition_stream)
        dist.all_reduce(overflow, op=dist.ReduceOp.MAX, group=self.dp_process_group)
        self._model_parallel_all_reduce(tensor=overflow, op=dist.ReduceOp.MAX)
        return bool(overflow[0].item())

    has_overflow.lean = True
    Stage3.has_overflow = has_overflow


def drop_optimizer_state(trainer):
    """Less host RAM for the final save: ZeRO-3 gathers a 16-bit copy of the weights into the first
    process's RAM (11.3 GiB for GPT-J), while Adam's moments and the fp32 gradients (67 GiB of RAM
    with the optimizer offloaded) would still be there. Training is over: nothing needs them."""
    zero = trainer.deepspeed.optimizer if trainer.is_deepspeed_enabled else None
    if not hasattr(zero, "fp32_partitioned_groups_flat"):
        return
    zero.optimizer.state.clear()
    for master_weights in zero.fp32_partitioned_groups_flat:
        master_weights.grad = None
    gc.collect()
    ReturnCachedPinnedMemory().on_train_begin(None, None, None)  # pinned gradients included


def drop_model(trainer):
    """Less host RAM for LoRA's merge, which reads the base model again: DeepSpeed's partitioned
    copy of it (12 GB of RAM with the model offloaded) goes first, and from_pretrained no longer
    builds models partitioned for ZeRO-3. The trainer cannot train or save after this."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = trainer.deepspeed = trainer.optimizer = None
    gc.collect()
    unset_hf_deepspeed_config()


class ReturnCachedPinnedMemory(TrainerCallback):
    """Less host RAM for the whole run with pinned buffers. torch keeps freed page-locked memory
    cached for reuse, and ZeRO-3 frees ~11.5 GiB of it for GPT-J once it has copied each parameter's
    pinned partition into one flat buffer; nothing would reuse it. Handed back once the DeepSpeed
    engine exists."""

    def on_train_begin(self, args, state, control, **kwargs):
        empty_host_cache = (getattr(torch.accelerator, "empty_host_cache", None)
                            or torch._C._host_emptyCache)
        if torch.cuda.is_available():
            empty_host_cache()
