"""Less GPU memory per sample for GPT-J, same numbers: the causal-LM loss in chunks and GELU in one kernel.

Together they took a sample of 2048 tokens from ~1,660 to ~737 MiB of GPU memory (bench/RESULTS.md), which is
what lets 26 samples instead of 10 fit a 24 GiB card.
"""

import torch


def causal_lm_loss(outputs, labels, num_items_in_batch=None):
    """The Trainer's causal-LM loss (each token predicts the next; labels of -100 are skipped; a sum over the
    tokens of the whole accumulated batch divided by num_items_in_batch, else the mean), computed without
    holding fp32 copies of all logits. The model's own loss converts every logit to fp32 and keeps its
    log-softmax, and backward adds two more fp32 copies: with GPT-J's 50,400-token vocabulary that is
    ~1.2 GB a sample of 2048 tokens. Here they exist for one chunk of tokens at a time."""
    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]  # the next token is each one's label
    logits = outputs.logits.flatten(0, 1)
    total = ChunkedCrossEntropy.apply(logits, labels.flatten().to(logits.device))
    if num_items_in_batch is None:
        return total / (labels != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits (tokens x vocabulary, FP16 or fp32) against labels, a chunk of tokens at
    a time in fp32. Forward keeps only the logits; backward recomputes each chunk and writes its gradient over
    it, since nothing needs the logits once the loss is known (one logits-sized tensor instead of two).
    Same values as F.cross_entropy on fp32 logits."""

    @staticmethod
    def forward(context, logits, labels, chunk_tokens=1024):
        context.save_for_backward(logits, labels)
        context.chunk_tokens = chunk_tokens
        return sum(torch.nn.functional.cross_entropy(rows.float(), targets, ignore_index=-100, reduction="sum")
                   for rows, targets in zip(logits.split(chunk_tokens), labels.split(chunk_tokens)))

    @staticmethod
    def backward(context, grad_total):
        logits, labels = context.saved_tensors
        for rows, targets in zip(logits.split(context.chunk_tokens), labels.split(context.chunk_tokens)):
            with torch.enable_grad():
                rows32 = rows.detach().float().requires_grad_()
                loss = torch.nn.functional.cross_entropy(rows32, targets, ignore_index=-100, reduction="sum")
                rows_grad = torch.autograd.grad(loss, rows32, grad_total)[0]
            rows.copy_(rows_grad)  # the gradient replaces the logits
        return logits, None, None


def one_kernel_gelu(config):
    """GPT-J's "gelu_new" is the tanh approximation of GELU written as eight tensor operations, four of whose
    results are kept for backward: ~256 MiB a sample in every layer being recomputed. PyTorch's
    gelu(approximate="tanh") is the same function in one operation that keeps only its input.
    out/config.json then says "gelu_pytorch_tanh", which every transformers version loads."""
    if getattr(config, "activation_function", None) == "gelu_new":
        config.activation_function = "gelu_pytorch_tanh"
    return config
