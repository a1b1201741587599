"""Run one stage or the whole build from Python, as the ``memforge`` CLI does."""
from __future__ import annotations

import os
from typing import Any, Sequence

from memforge.storage.artifact import REBUILD_OUTDATED
from memforge.storage.errors import MemforgeError
from memforge.storage.params import Params, apply_overrides, params_file
from memforge.storage.params import load_params as _load_params

ParamsSource = str | os.PathLike | Params | None


def load_params(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Params:
    """Read a params file (default: ``./params.yaml`` when present, else the defaults), apply ``KEY=VALUE``
    overrides (``"targets.k=128"``, as ``--set``) and validate; errors name the file and dotted key."""
    return _load_params(path, list(overrides))


def _rebuild_mode(rebuild: bool | str) -> bool | str:
    if rebuild in (True, False, "outdated"):
        return REBUILD_OUTDATED if rebuild == "outdated" else rebuild
    raise MemforgeError(f"rebuild: expected True, False or 'outdated', got {rebuild!r}")


def run_stage(name: str, params: ParamsSource = None, *, overrides: Sequence[str] = (),
              rebuild: bool | str = False, beam_args: Sequence[str] = ()) -> Any:
    """Run stage ``name`` (``prepare``, ``train-decoder``, ``encode``, ``index``, ``targets``, ``train-memory``,
    ``evaluate``) as ``memforge NAME`` does: it resumes an interrupted build and is a no-op when its artifact is
    up to date.

    Args:
        params: a params file, a `Params` from `load_params`, or None for ``./params.yaml`` / the defaults.
        overrides: ``KEY=VALUE`` strings applied on top, as ``--set``.
        rebuild: True discards any artifact there and builds again; ``"outdated"`` replaces one built with
            other params, inputs or code (what ``dvc repro`` runs); False refuses to.
        beam_args: Beam pipeline options, e.g. ``["--runner=dask", "--dask_client_address=tcp://host:8786"]``.

    Returns:
        What the stage published (its artifacts' paths and fingerprints).
    """
    from memforge.flows import stages

    if isinstance(params, Params):
        params = apply_overrides(params.model_dump(mode="json"), list(overrides)) if overrides else params
    else:
        params = load_params(params, overrides)
    return stages.run_stage(name, params, rebuild=_rebuild_mode(rebuild), beam_args=tuple(beam_args))


def run(params: str | os.PathLike | None = None, *, overrides: Sequence[str] = (), first: str | None = None,
        last: str | None = None, rebuild: bool = False, beam_args: Sequence[str] = ()) -> dict:
    """Run the Prefect flow ``memforge-build`` (all stages, or ``first``..``last``) as ``memforge run`` does:
    unchanged stages come from Prefect's cache, outdated artifacts are replaced, interrupted ones resume.
    Without ``PREFECT_API_URL`` a temporary local Prefect server runs for the call.

    Returns:
        ``{"stages": {name: state}, "artifacts_dir": ..., "metrics": path of metrics.json or None}``.
    """
    load_params(params, overrides)  # bad params fail here, before any flow run starts
    from memforge.flows.build import build
    from memforge.flows.server import prefect_api

    with prefect_api():  # on Ctrl-C: the stage stops, the flow run is reported, then the server stops
        return build(params_file=params_file(params), overrides=list(overrides), first=first, last=last,
                     rebuild=rebuild, beam_args=list(beam_args))
