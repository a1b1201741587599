"""Upstream lineage of an artifact, followed through the ``inputs`` of each manifest."""
from __future__ import annotations

from memforge.storage import fs
from memforge.storage.artifact import read_manifest
from memforge.storage.dvc_lock import dvc_agreement
from memforge.storage.errors import ArtifactError


def lineage(uri: str, role: str | None = None, expected_fingerprint: str | None = None,
            _seen: frozenset[str] = frozenset(), expected_content: str | None = None) -> dict:
    """A tree node for ``uri``: kind, path, fingerprint, params, how it was run (execution), code, when,
    run, and its inputs' nodes.

    A node whose upstream has changed since it was built (content digest differs from the one
    recorded as its input) carries ``stale_input``; an unreadable upstream carries ``error``.
    """
    node: dict = {"role": role, "uri": uri}
    try:
        manifest = read_manifest(uri)
    except ArtifactError as exc:
        return {**node, "fingerprint": expected_fingerprint, "error": str(exc), "inputs": []}
    run = manifest.get("run", {})
    node.update({
        "kind": manifest["kind"],
        "fingerprint": manifest["fingerprint"],
        "params": manifest.get("params", {}),
        "execution": manifest.get("execution", {}),
        "code": manifest.get("code", {}),
        "created": run.get("finished_at"),
        "run_id": run.get("run_id"),
        "flow_run_id": run.get("flow_run_id"),
        "counts": manifest.get("counts", {}),
        "stats": manifest.get("stats", {}),
        "dvc": dvc_agreement(uri) if fs.is_local(uri) else None,
    })
    if expected_content and expected_content != manifest.get("content_digest"):
        node["stale_input"] = f"built from content {expected_content[:12]}, upstream now holds " \
                              f"{str(manifest.get('content_digest'))[:12]} (fingerprint {manifest['fingerprint'][:12]})"
    if uri in _seen:
        node["error"] = "cycle in lineage"
        node["inputs"] = []
        return node
    node["inputs"] = [
        lineage(fs.resolve(uri, i["uri"]), i.get("role"), i.get("fingerprint"), _seen | {uri}, i.get("content_digest"))
        for i in manifest.get("inputs", [])
    ]
    return node


def scalar_pairs(mapping: dict) -> str:
    """``key=value`` for the scalar entries of ``mapping`` (nested sections left out), space-separated."""
    return " ".join(f"{k}={v}" for k, v in mapping.items() if not isinstance(v, (dict, list)))


def render(node: dict, prefix: str = "", last: bool = True, root: bool = True,
           shown: set[tuple[str, str]] | None = None) -> list[str]:
    """Text tree of a lineage node, one block of lines per artifact; an artifact reached again by
    another path is one line pointing up."""
    shown = set() if shown is None else shown
    branch = "" if root else ("└── " if last else "├── ")
    child_prefix = prefix + ("" if root else ("    " if last else "│   "))
    role = f"[{node['role']}] " if node.get("role") else ""
    fingerprint = (node.get("fingerprint") or "?")[:16]
    lines = [f"{prefix}{branch}{role}{node.get('kind', '?')}  {node['uri']}  fingerprint {fingerprint}"]
    identity = (node["uri"], node.get("fingerprint") or "?")
    if identity in shown and "error" not in node:
        lines[0] += "  (shown above)"
        return lines
    shown.add(identity)
    if "error" in node:
        lines.append(f"{child_prefix}    ! {node['error']}")
    else:
        code = node["code"]
        sha = (code.get("git_sha") or "no-git")[:12] + ("+dirty" if code.get("git_dirty") else "")
        lines.append(f"{child_prefix}    params: {scalar_pairs(node['params']) or '-'}")
        if node.get("execution"):  # how it was run: provenance, never part of the fingerprint
            lines.append(f"{child_prefix}    execution: {scalar_pairs(node['execution'])}")
        lines.append(f"{child_prefix}    code: memforge {code.get('package_version')} {sha} "
                     f"src {code.get('source_digest', '?')[:12]}")
        lines.append(f"{child_prefix}    built: {node['created']}  run {node['run_id']}"
                     + (f"  prefect flow run {node['flow_run_id']}" if node.get("flow_run_id") else ""))
        if node.get("stats"):
            lines.append(f"{child_prefix}    stats: {scalar_pairs(node['stats'])}")
        if node.get("dvc"):
            dvc = node["dvc"]
            lines.append(f"{child_prefix}    {'dvc' if dvc['agrees'] else '! dvc'}: stage {dvc['stage']} "
                         f"({', '.join(dvc['outs'])}): {dvc['detail']}")
        if "stale_input" in node:
            lines.append(f"{child_prefix}    ! stale: {node['stale_input']}")
    for i, child in enumerate(node["inputs"]):
        lines += render(child, child_prefix, i == len(node["inputs"]) - 1, root=False, shown=shown)
    return lines
