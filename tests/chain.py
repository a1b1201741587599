"""The whole tiny demo chain for the training tests: prepare -> train-decoder -> encode -> index ->
targets -> train-memory on a small Greek-letter corpus, with settings small enough for CI."""
from __future__ import annotations

from pathlib import Path

from memforge.flows.stages import run_stage
from memforge.storage.params import load_params

from tiny_lm import write_corpus

SETTINGS = {"decoder.vocab_size": 320, "decoder.n_layer": 2, "decoder.n_head": 2, "decoder.n_embd": 48,
            "decoder.block_size": 32, "decoder.batch_size": 8, "decoder.max_steps": 40, "decoder.warmup_steps": 5,
            "decoder.learning_rate": 0.005, "decoder.checkpoint_every": 40,
            "encode.block_size": 32, "encode.stride": 16, "encode.chunk_rows": 64, "encode.shard_chunks": 2,
            "targets.k": 8, "targets.width": 8, "targets.temperature": 4.0, "targets.keep_neighbours": "true",
            "memory.depth": 2, "memory.hidden_mult": 2, "memory.batch_size": 64, "memory.max_steps": 30,
            "memory.warmup_steps": 3, "memory.learning_rate": 0.003, "memory.checkpoint_every": 10,
            "memory.shuffle_buffer_chunks": 2, "evaluate.k": 8, "evaluate.temperature_grid": "[2.0, 4.0]"}


def stage_args(root, art, **overrides) -> list[str]:
    settings = {"artifacts_dir": art, "corpus.train": f"[{root}/corpus/train/*.txt]",
                "corpus.validation": f"[{root}/corpus/validation/*.txt]", **SETTINGS, **overrides}
    args = ["--params", str(root / "params.yaml")]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def overrides(args: list[str]) -> list[str]:
    """The ``--set`` values of CLI ``args``."""
    return [value for flag, value in zip(args, args[1:]) if flag == "--set"]


def build_chain(root: Path) -> dict:
    """Run every stage up to train-memory under ``root`` (the same call as the CLI's, recording the params
    keys each stage reads); returns where things are and the reads."""
    write_corpus(root / "corpus" / "train", 6, 150, seed=7)
    write_corpus(root / "corpus" / "validation", 2, 60, seed=8)
    (root / "params.yaml").write_text("{}\n")
    args = stage_args(root, root / "art")
    params = load_params(root / "params.yaml", overrides(args))
    reads = {}
    for stage in ("prepare", "train-decoder", "encode", "index", "targets", "train-memory"):
        reads[stage] = set()
        run_stage(stage, params, beam_args=("--direct_running_mode=in_memory",), reads=reads[stage])
    return {"root": root, "art": root / "art", "args": args, "reads": reads}


def write_project(root: Path, art: Path | str = "artifacts") -> Path:
    """A tiny project under ``root``: the corpus and a complete params.yaml of the shipped params with
    ``SETTINGS`` (what `memforge run`, Prefect and DVC read); returns the params file."""
    import yaml

    from memforge.storage.params import load_params

    write_corpus(root / "corpus" / "train", 6, 150, seed=7)
    write_corpus(root / "corpus" / "validation", 2, 60, seed=8)
    settings = {"artifacts_dir": art, "corpus.train": f"[{root}/corpus/train/*.txt]",
                "corpus.validation": f"[{root}/corpus/validation/*.txt]", "flow.retry_delay_s": 0, **SETTINGS}
    params = load_params(Path(__file__).resolve().parent.parent / "params.yaml",
                         [f"{key}={value}" for key, value in settings.items()])
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    return path


def rewrite_manifest(artifact_dir: Path, edit) -> None:
    """Apply ``edit`` to an artifact's manifest and recompute its fingerprint, as another build would have
    written it: only cross-artifact checks can then tell (a plain hand edit is refused earlier)."""
    import json

    from memforge.storage.artifact import fingerprint

    manifest = artifact_dir / "_manifest.json"
    data = json.loads(manifest.read_text())
    edit(data)
    data["fingerprint"] = fingerprint(data["kind"], data["params"],
                                      {i["role"]: i["content_digest"] for i in data["inputs"]}, data["code"])
    manifest.write_text(json.dumps(data))


def reseal(artifact_dir: Path, edit=None) -> None:
    """Recompute the checksum of every recorded file, the content digest and the fingerprint after ``edit`` (of the
    manifest, optional): what someone who rewrote a file does so that every checksum holds again."""
    from memforge.storage import fs
    from memforge.storage.artifact import content_digest

    def sealed(data: dict) -> None:
        if edit is not None:
            edit(data)
        data["files"] = {rel: fs.file_checksum(str(artifact_dir / rel)) for rel in data["files"]}
        data["content_digest"] = content_digest(data["kind"], data["files"], data.get("content_excludes", ()))

    rewrite_manifest(artifact_dir, sealed)


def write_object_npy(path: Path, rows: int) -> None:
    """What ``np.save`` writes for an object array of ``rows`` items: an object-dtype header, then a pickle (here
    of None, written by hand: nothing may ever read it)."""
    import numpy as np

    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|O", "fortran_order": False, "shape": (rows,)})
        handle.write(b"\x80\x04N.")
