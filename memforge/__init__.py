"""memforge: build, version and read the training data of MLP Memory.

The public API is what this module exports (``memforge.__all__``); everything under ``memforge.storage``,
``memforge.pipelines``, ``memforge.training``, ``memforge.flows`` and ``memforge.bench`` is internal and may
change without notice.

```python
import memforge

memforge.run_stage("prepare", "params.yaml", overrides=["targets.k=1024"])
targets = memforge.read_targets("artifacts/targets/train")
print(targets.artifact.lineage()["params"], len(targets))
loader = torch.utils.data.DataLoader(targets.iterable(shuffle=True), batch_size=512)
```
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from memforge import hf_registry
from memforge.artifacts import Artifact, lineage, open_artifact, verify
from memforge.readers import Keys, Targets, read_keys, read_targets
from memforge.runs import load_params, run, run_stage
from memforge.storage.errors import MemforgeError
from memforge.storage.params import Params

if TYPE_CHECKING:  # torch is imported only when a dataset is asked for
    from memforge.datasets import TargetsDataset, TargetsIterable

__all__ = [
    "Artifact", "Keys", "MemforgeError", "Params", "Targets", "TargetsDataset", "TargetsIterable", "lineage",
    "load_params", "open_artifact", "read_keys", "read_targets", "run", "run_stage", "verify",
]

hf_registry.install()  # exported models load with AutoModelForCausalLM, no trust_remote_code


def __getattr__(name: str):
    if name in ("TargetsDataset", "TargetsIterable"):
        from memforge import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'memforge' has no attribute {name!r}")
