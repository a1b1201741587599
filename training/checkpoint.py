"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

``<artifact>/_checkpoints/step-NNNNNNN/`` holds ``state.safetensors`` (model weights, optimizer
tensors, the weights' running average when training keeps one, torch RNG states) and ``trainer.json``
(step, optimizer hyper-parameters, data position, loss history, fp16 loss scale), written last: a
checkpoint without it is incomplete and ignored.
Both files are written atomically; only the newest ``keep`` checkpoints stay. Data order is a
function of the seed and the step, so the step is the data position. Tensors are saved from CPU
copies and restored onto the device of the parameters they belong to, so a checkpoint written on a
GPU resumes on a CPU and the reverse.
"""
from __future__ import annotations

import logging

import torch
from safetensors.torch import load, save

from memforge.storage import fs
from memforge.storage.artifact import CHECKPOINTS_DIR

log = logging.getLogger("memforge")

DIR = CHECKPOINTS_DIR  # the artifact layer treats it as resumable progress
STATE = "state.safetensors"
TRAINER = "trainer.json"


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cpu_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict as CPU copies, keys under ``prefix.``."""
    return {f"{prefix}.{k}": v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def _under(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` whose keys start with ``prefix.``, the prefix removed."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _step_dir(root: str, step: int) -> str:
    return fs.join(root, DIR, f"step-{step:07d}")


class Checkpoints:
    """Save and restore a training run's state under one artifact directory."""

    def __init__(self, root: str, keep: int = 2):
        self.root, self.keep = fs.normalize(root), keep

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        names = {rel.split("/")[0] for rel in fs.list_files(fs.join(self.root, DIR)) if rel.endswith("/" + TRAINER)}
        return sorted(int(name.split("-")[1]) for name in names)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, trainer: dict, average: torch.nn.Module | None = None) -> None:
        """Write the checkpoint of ``step`` (trainer.json last), then drop the oldest beyond ``keep``; ``average``
        is a running average of the model's weights (``AveragedModel``), saved beside them."""
        tensors = _cpu_state("model", model)
        if average is not None:
            tensors.update(_cpu_state("average", average))
        optimizer_state = optimizer.state_dict()
        scalars = {}
        for index, entry in optimizer_state["state"].items():
            for name, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{name}"] = value.cpu().contiguous()
                else:
                    scalars[f"{index}.{name}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        device = _device_of(model)
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
        where = _step_dir(self.root, step)
        fs.write_bytes_atomic(fs.join(where, STATE), save(tensors))
        fs.write_json_atomic(fs.join(where, TRAINER), {
            **trainer, "step": step,
            "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
            "grad_scaler": scaler.state_dict(),  # empty unless fp16 loss scaling is on
        })
        for old in self.steps()[:-self.keep]:
            fs.remove_tree(_step_dir(self.root, old))

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, average: torch.nn.Module | None = None) -> dict | None:
        """Load the newest complete checkpoint into ``model``, ``optimizer``, ``scaler``, ``average`` and torch's
        RNG; return its trainer record, or None when there is none."""
        steps = self.steps()
        if not steps:
            return None
        where = _step_dir(self.root, steps[-1])
        filesystem, path = fs.filesystem(fs.join(where, STATE))
        with filesystem.open(path, "rb") as handle:
            tensors = load(handle.read())
        record = fs.read_json(fs.join(where, TRAINER))
        model.load_state_dict(_under("model", tensors))
        if average is not None:
            average.load_state_dict(_under("average", tensors))
        state: dict[int, dict] = {}
        for key, value in [*_under("optimizer", tensors).items(), *record["optimizer"]["scalars"].items()]:
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state, "param_groups": record["optimizer"]["param_groups"]})
        if record.get("grad_scaler"):
            scaler.load_state_dict(record["grad_scaler"])
        torch.set_rng_state(tensors["rng.torch"])
        device = _device_of(model)
        if device.type == "cuda" and "rng.cuda" in tensors:  # a CPU checkpoint has none: the GPU keeps its seed
            torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        log.info("resuming from the checkpoint of step %d (%s)", record["step"], where)
        return record
