"""How much GPU memory training the MLP memory takes, from its shape alone (nothing is built or allocated).

Per rank of a data-parallel (DDP) job, as ``train-memory`` trains: fp32 weights (the master copy, also under
bf16/fp16 autocast), fp32 gradients of the trainable parameters, AdamW's two fp32 moments per trainable
parameter, the EMA copy of every weight (``memory.ema_decay``), DDP's gradient buckets (one more fp32 gradient,
as ``DistributedDataParallel`` is built by default), and under autocast the bf16/fp16 copies of the Linear
weights that the forward saves for backward. Activations per batch row are the tensors the forward saves for
backward (measured with ``torch.autograd.graph.saved_tensors_hooks`` in tests/test_sizes.py), the logits the
training loop holds, and the float32 [vocab] temporaries of the loss's backward. AdamW's step needs one fp32
copy of the trainable weights as scratch (torch's default foreach implementation on CUDA), after backward has
freed the activations: a rank's peak is its states plus the larger of the two.
"""
from __future__ import annotations

FP32 = 4
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # the autocast dtype of the Linear layers
STORED_TOKENS = 32  # targets.width's default: the stored target tokens per row
GIB = 2 ** 30
HEADROOM = 0.1  # of a GPU's memory, left for the CUDA context, cuBLAS workspaces and allocator fragmentation
# GPU sizes are taken as GiB: an "80 GB" H100 reports 79.2 GiB, so its 72 usable GiB lie within it
GPUS_GB = (24, 40, 80)
BATCH_ROWS = 512  # memory.batch_size's default
# (name, decoder hidden size, vocabulary)
REFERENCE = (("GPT-2 small", 768, 50257), ("GPT-2 medium", 1024, 50257), ("GPT-2 large", 1280, 50257),
             ("d 4096, 128k vocab", 4096, 128256))


def parameter_count(input_dim: int, vocab_size: int, depth: int = 4, hidden_mult: int = 8, lm_head: str = "tied",
                    width: int | None = None) -> tuple[int, int]:
    """(total, trainable) parameters of an ``MLPMemory``; a ``frozen`` LM head is not trained."""
    w = width or input_dim
    hidden = w * hidden_mult
    project = input_dim * w + w if w != input_dim else 0
    blocks = depth * (2 * w + w * hidden + hidden + hidden * w + w)
    head = vocab_size * w
    total = project + blocks + 2 * w + head
    return total, total - head if lm_head == "frozen" else total


def saved_weight_count(input_dim: int, vocab_size: int, depth: int = 4, hidden_mult: int = 8,
                       width: int | None = None) -> int:
    """Elements of the Linear weights whose autocast copies the forward saves for backward: the blocks' and the
    head's (their inputs need gradients); not the input projection's (its input is data)."""
    w = width or input_dim
    return depth * 2 * w * w * hidden_mult + vocab_size * w


def state_bytes(input_dim: int, vocab_size: int, depth: int = 4, hidden_mult: int = 8, lm_head: str = "tied",
                width: int | None = None, precision: str = "fp32", ema: bool = True,
                ddp: bool = True) -> dict[str, int]:
    """Bytes a rank holds whatever its batch: weights, gradients, AdamW moments, EMA copy, DDP gradient buckets,
    autocast weight copies (forward to backward), and the AdamW step's scratch (after backward)."""
    total, trainable = parameter_count(input_dim, vocab_size, depth, hidden_mult, lm_head, width)
    copies = 0 if precision == "fp32" else COMPUTE_BYTES[precision] * saved_weight_count(
        input_dim, vocab_size, depth, hidden_mult, width)
    return {"weights": FP32 * total, "gradients": FP32 * trainable, "adamw": 2 * FP32 * trainable,
            "ema": FP32 * total if ema else 0, "ddp_buckets": FP32 * trainable if ddp else 0,
            "autocast_weights": copies, "adamw_scratch": FP32 * trainable}


def activation_bytes_per_row(input_dim: int, vocab_size: int, depth: int = 4, hidden_mult: int = 8,
                             lm_head: str = "tied", width: int | None = None, precision: str = "fp32",
                             stored_tokens: int = STORED_TOKENS, device: str = "cuda") -> dict[str, int]:
    """Bytes per batch row: ``saved`` (what the forward saves for backward), ``logits`` (the training loop's
    reference) and ``loss_backward`` (float32 [vocab] temporaries at the backward's peak); ``total`` sums them.

    Saved, with ``a`` the autocast dtype's size: per block the LayerNorm's input (fp32, cast so under
    autocast) and its mean and 1/std, the up-projection's input (the LayerNorm output), its output (the
    activation's input) and the activation's output; the final LayerNorm's the same and the head's input (not
    for a frozen head); the input projection's input when ``width`` widens; in the loss, the float32
    log-softmax [vocab], its copy with the stored tokens masked out (the remainder bucket's logsumexp) and
    that mask (bool), plus the gathered indices and target probabilities (12 bytes per stored token) and
    17 bytes of per-row scalars. The loss's backward holds, at its peak, the gradient of the log-softmax and
    the logsumexp backward's three float32 [vocab] temporaries.

    CUDA's autocast runs LayerNorm in float32; CPU's runs it in its input's dtype, which differs only when a
    ``width`` projection puts the residual stream in the autocast dtype (``device="cpu"`` counts that).
    """
    a = COMPUTE_BYTES[precision]
    w = width or input_dim
    hidden = w * hidden_mult
    project = a * input_dim if w != input_dim else 0
    stream = a if project and device == "cpu" else FP32  # the LayerNorm input's dtype
    norm = stream * w + 2 * FP32  # LayerNorm input, mean, 1/std
    blocks = depth * (norm + a * w + 2 * a * hidden)
    head = norm + (a * w if lm_head != "frozen" else 0)
    loss = (2 * FP32 + 1) * vocab_size + 12 * stored_tokens + 17
    saved = project + blocks + head + loss
    logits = a * vocab_size
    loss_backward = 4 * FP32 * vocab_size
    return {"saved": saved, "logits": logits, "loss_backward": loss_backward,
            "total": saved + logits + loss_backward}


def rank_bytes(input_dim: int, vocab_size: int, depth: int = 4, hidden_mult: int = 8, lm_head: str = "tied",
               width: int | None = None, precision: str = "fp32", ema: bool = True, ddp: bool = True,
               rows: int = BATCH_ROWS) -> dict[str, int]:
    """A rank's bytes with ``rows`` batch rows: ``states`` (weights + gradients + AdamW + EMA), ``buckets``,
    ``activations`` (``rows`` x per row) and ``total``, its peak: states + buckets + the larger of
    (activations + autocast weight copies) in backward and the AdamW scratch in the step. The gradients are
    counted through backward although they fill in only as the activations are freed: an upper bound."""
    state = state_bytes(input_dim, vocab_size, depth, hidden_mult, lm_head, width, precision, ema, ddp)
    activations = rows * activation_bytes_per_row(input_dim, vocab_size, depth, hidden_mult, lm_head, width,
                                                  precision)["total"]
    states = state["weights"] + state["gradients"] + state["adamw"] + state["ema"]
    peak = max(activations + state["autocast_weights"], state["adamw_scratch"])
    return {"states": states, "buckets": state["ddp_buckets"], "activations": activations,
            "total": states + state["ddp_buckets"] + peak}


def usable_bytes(gpu_gb: float) -> float:
    """What a GPU of ``gpu_gb`` GiB leaves to training after ``HEADROOM``."""
    return (1 - HEADROOM) * gpu_gb * GIB


def smallest_gpu(total: int) -> int | None:
    """The smallest GPU of ``GPUS_GB`` whose usable memory holds ``total`` bytes (None: not even the largest)."""
    return next((gb for gb in GPUS_GB if total <= usable_bytes(gb)), None)


def fsdp_threshold(vocab_size: int = 128256, precision: str = "fp32", gpu_gb: int = 80, step: int = 128,
                   rows: int = BATCH_ROWS) -> tuple[int, int]:
    """(width, parameters) of the narrowest default-shaped memory (depth 4, hidden_mult 8, tied head) over
    ``vocab_size`` whose DDP rank no longer fits a ``gpu_gb`` GPU: from there on it needs sharding."""
    d = step
    while rank_bytes(d, vocab_size, precision=precision, rows=rows)["total"] <= usable_bytes(gpu_gb):
        d += step
    return d, parameter_count(d, vocab_size)[0]


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def docs_table(rows: int = BATCH_ROWS) -> str:
    """The reference sizes' table in docs/training.md, at the defaults (depth 4, hidden_mult 8, tied head);
    pairs are fp32 / bf16."""
    lines = ["| decoder (d, vocab) | parameters | weights + grads + AdamW + EMA, GiB | DDP buckets, GiB | "
             f"activations per row, MiB | activations, {rows} rows, GiB | total per rank, GiB | smallest GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, d, vocab in REFERENCE:
        fp32, bf16 = (rank_bytes(d, vocab, precision=p, rows=rows) for p in ("fp32", "bf16"))
        per_row = [activation_bytes_per_row(d, vocab, precision=p)["total"] / 2 ** 20 for p in ("fp32", "bf16")]
        fits = dict.fromkeys(f"{gb} GB" if gb else "none" for gb in map(smallest_gpu, (fp32["total"], bf16["total"])))
        lines.append(f"| {name} ({d}, {vocab}) | {_count(parameter_count(d, vocab)[0])} | {_gib(fp32['states'])} | "
                     f"{_gib(fp32['buckets'])} | {per_row[0]:.2f} / {per_row[1]:.2f} | "
                     f"{_gib(fp32['activations'])} / {_gib(bf16['activations'])} | "
                     f"{_gib(fp32['total'])} / {_gib(bf16['total'])} | {' / '.join(fits)} |")
    return "\n".join(lines)
