"""Datastore windows (the reference sliding-window evaluation) and the keys they give.

Window ``w`` starts at ``w * stride`` and is at most ``block_size`` tokens long; it contributes only
the targets past its overlap with window ``w - 1`` (window 0 contributes all of its targets).
Datastore row ``i`` has value ``token[i + 1]`` and key = the captured representation at position
``i`` of the window that owns target ``i + 1``. Used by encode, online memory training and evaluate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memforge.storage.stores import PartOffsets, TokenStore


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` of the split stream, contributing targets ``[first, stop)``."""

    begin: int
    end: int
    first: int
    stop: int


def windows_for_rows(start: int, stop: int, n_tokens: int, block_size: int, stride: int) -> list[Window]:
    """The windows that own the targets of datastore rows ``[start, stop)`` (targets ``start+1 .. stop``)."""
    first_target, stop_target = start + 1, stop + 1

    def owner(target: int) -> int:
        return 0 if target < block_size else (target - block_size) // stride + 1

    windows = []
    for w in range(owner(first_target), owner(stop_target - 1) + 1):
        begin = w * stride
        end = min(begin + block_size, n_tokens)
        own_first = 1 if w == 0 else begin + block_size - stride
        windows.append(Window(begin, end, max(own_first, first_target), min(end, stop_target)))
    return windows


def window_batches(windows: list[Window], batch_size: int):
    """Windows grouped by length (so a batch stacks into one tensor), ``batch_size`` at a time."""
    by_length: dict[int, list[Window]] = {}
    for window in windows:
        by_length.setdefault(window.end - window.begin, []).append(window)
    for group in by_length.values():
        for i in range(0, len(group), batch_size):
            yield group[i:i + batch_size]


def encode_rows(model, capture, reader: TokenStore, offsets: PartOffsets, start: int, stop: int, block_size: int,
                stride: int, batch_size: int, hidden: int,
                dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, int]:
    """Keys ([rows, hidden], ``dtype``: float32 or float16), values (int32) and window tokens read, for
    datastore rows ``[start, stop)``: the windows that own those targets, batched by length, through
    ``capture`` on the model's device. Keys are cast to ``dtype`` there (round to nearest even, as numpy
    does), so a GPU copies half the bytes for float16 keys."""
    import torch

    windows = windows_for_rows(start, stop, offsets.total_rows, block_size, stride)
    base = windows[0].begin
    tokens = reader.read_rows(offsets, base, windows[-1].end)
    keys = np.empty((stop - start, hidden), dtype)
    device, cast = next(model.parameters()).device, getattr(torch, dtype)
    with torch.inference_mode():
        for batch in window_batches(windows, batch_size):
            ids = np.stack([tokens[w.begin - base:w.end - base] for w in batch]).astype(np.int64)
            states = capture(model, torch.from_numpy(ids).to(device)).to(cast).cpu().numpy()
            for row, w in zip(states, batch):
                keys[w.first - 1 - start:w.stop - 1 - start] = row[w.first - 1 - w.begin:w.stop - 1 - w.begin]
    vals = tokens[start + 1 - base:stop + 1 - base]
    return keys, vals, sum(w.end - w.begin for w in windows)
