"""The memforge_tiny task's documents: memforge_tiny.jsonl beside this file, as a ``datasets`` split."""
from __future__ import annotations

import json
from pathlib import Path

import datasets

DOCUMENTS = Path(__file__).with_name("memforge_tiny.jsonl")


def load(**_metadata) -> datasets.DatasetDict:
    """The test split (lm-eval passes the task's metadata, which it does not need)."""
    rows = [json.loads(line) for line in DOCUMENTS.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
