"""training/sizes.py against real models: parameter counts of MLPMemory built on the meta device, the per-row
activation estimate against the bytes a small real forward saves for backward (saved_tensors_hooks) and against
the measured peak of its forward and backward (the profiler's CPU memory events), and the docs table."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from memforge.training import sizes
from memforge.training.memory import memory_loss
from memforge.training.mlp_memory import MemoryConfig, MLPMemory

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parent.parent / "docs" / "training.md"
# A small memory whose vocabulary dominates a row, as the reference sizes' does.
D, VOCAB, DEPTH, MULT, STORED = 32, 4000, 2, 4, 8
SAVED_TOLERANCE = 0.01  # the saved-tensor count is exact on CPU; 1% leaves room for torch versions
PEAK_TOLERANCE = 0.02  # a few small saved tensors are freed before the peak: the estimate is ~0.1% above it


def build(lm_head: str, width: int | None = None, device: str = "cpu", input_dim: int = D,
          vocab: int = VOCAB, depth: int = DEPTH, mult: int = MULT) -> MLPMemory:
    torch.manual_seed(0)
    with torch.device(device):
        memory = MemoryConfig(input_dim, vocab, depth, mult, "gelu", lm_head, width).build()
        if lm_head != "own":  # as train-memory does: the decoder's head, frozen unless tied
            memory.use_decoder_head(torch.zeros(vocab, width or input_dim))
    return memory


def forward_loss(memory: MLPMemory, rows: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of one batch as train-memory computes them (autocast on CPU for bf16)."""
    generator = torch.Generator().manual_seed(1)
    states = torch.randn(rows, D, generator=generator)
    tokens = torch.randint(0, VOCAB, (rows, STORED), generator=generator)
    probs = torch.rand(rows, STORED, generator=generator) / STORED
    remainder, next_token = torch.rand(rows, generator=generator), torch.randint(0, VOCAB, (rows,), generator=generator)
    autocast = contextlib.nullcontext() if precision == "fp32" else torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:
        logits = memory(states)
    return logits, memory_loss(logits, tokens, probs, remainder, next_token, 0.9)[0]


def saved_bytes(memory: MLPMemory, rows: int, precision: str) -> int:
    """Bytes of the distinct storages the forward saves for backward, the parameters themselves left out."""
    parameters = {p.untyped_storage().data_ptr() for p in memory.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward_loss(memory, rows, precision)
    return sum(saved.values())


def peak_bytes(memory: MLPMemory, rows: int, precision: str) -> int:
    """Peak of the CPU bytes allocated during a forward and backward (the profiler's memory events: each
    op's allocations at its start, its frees at its end)."""
    memory.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        logits, loss = forward_loss(memory, rows, precision)
        loss.backward()
        del logits, loss
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("name,d,vocab", sizes.REFERENCE)
def test_parameter_counts_are_the_built_memorys(name, d, vocab):
    for lm_head in ("tied", "frozen", "own"):
        memory = build(lm_head, device="meta", input_dim=d, vocab=vocab, depth=4, mult=8)
        total = sum(p.numel() for p in memory.parameters())
        trainable = sum(p.numel() for p in memory.parameters() if p.requires_grad)
        assert sizes.parameter_count(d, vocab, 4, 8, lm_head) == (total, trainable), (name, lm_head)
    widened = build("own", width=d + 256, device="meta", input_dim=d, vocab=vocab, depth=4, mult=8)
    assert sizes.parameter_count(d, vocab, 4, 8, "own", d + 256)[0] == sum(p.numel() for p in widened.parameters())


def test_gpt2_small_memory_has_76_million_parameters():
    assert sizes.parameter_count(768, 50257) == (76_381_440, 76_381_440)
    assert sizes.parameter_count(4096, 128256)[0] == 1_599_266_816


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lm_head,width", [("tied", None), ("frozen", None), ("own", 48)])
def test_saved_activations_match_the_estimate(precision, lm_head, width):
    """Saved bytes at two batch sizes: the slope is the per-row estimate, the intercept the autocast weight
    copies (0 in fp32; a 4-byte loss scalar aside)."""
    memory = build(lm_head, width)
    small, large = saved_bytes(memory, 16, precision), saved_bytes(memory, 48, precision)
    per_row = (large - small) / 32
    estimate = sizes.activation_bytes_per_row(D, VOCAB, DEPTH, MULT, lm_head, width, precision, STORED,
                                              device="cpu")["saved"]
    assert abs(per_row - estimate) <= SAVED_TOLERANCE * estimate, (per_row, estimate)
    fixed = small - 16 * per_row
    copies = sizes.state_bytes(D, VOCAB, DEPTH, MULT, lm_head, width, precision)["autocast_weights"]
    assert abs(fixed - copies) <= SAVED_TOLERANCE * copies + 64, (fixed, copies)


@pytest.mark.parametrize("precision,lm_head", [("fp32", "tied"), ("bf16", "frozen")])
def test_peak_activations_match_the_estimate(precision, lm_head):
    """The whole per-row term (saved + the logits the loop holds + the loss's backward temporaries) against
    the measured peak's growth per row."""
    memory = build(lm_head)
    per_row = (peak_bytes(memory, 96, precision) - peak_bytes(memory, 32, precision)) / 64
    estimate = sizes.activation_bytes_per_row(D, VOCAB, DEPTH, MULT, lm_head, None, precision, STORED,
                                              device="cpu")
    assert estimate["loss_backward"] > estimate["saved"]  # the vocabulary terms are most of a row here
    assert abs(per_row - estimate["total"]) <= PEAK_TOLERANCE * estimate["total"], (per_row, estimate)


def test_rank_total_is_states_plus_the_larger_of_activations_and_scratch():
    state = sizes.state_bytes(4096, 128256)
    rank = sizes.rank_bytes(4096, 128256, rows=512)
    assert rank["states"] == 20 * sizes.parameter_count(4096, 128256)[0]
    assert state["adamw_scratch"] > rank["activations"]  # at d 4096 the optimizer step is the peak
    assert rank["total"] == rank["states"] + rank["buckets"] + state["adamw_scratch"]
    few_rows = sizes.rank_bytes(768, 50257, rows=512 // 8)
    assert few_rows["activations"] * 8 == sizes.rank_bytes(768, 50257, rows=512)["activations"]
    assert sizes.rank_bytes(768, 50257, ema=False)["states"] == 16 * sizes.parameter_count(768, 50257)[0]


def test_docs_hold_the_computed_table_and_threshold():
    section = DOCS.read_text(encoding="utf-8").split("## Sizes: when data parallelism fits", 1)[1]
    assert sizes.docs_table() in section
    for precision in ("fp32", "bf16"):
        d, parameters = sizes.fsdp_threshold(precision=precision)
        assert f"d {d}" in section and f"{parameters / 1e9:.2f} B parameters" in section
        assert sizes.rank_bytes(d - 128, 128256, precision=precision)["total"] <= sizes.usable_bytes(80)
    assert all(sizes.smallest_gpu(sizes.rank_bytes(d, v, precision=p)["total"]) is not None
               for _, d, v in sizes.REFERENCE for p in ("fp32", "bf16")), "a reference size needs sharding"
