"""Typed configuration: ``params.yaml`` (the same file DVC reads) parsed into one model per stage.

Unknown keys and bad values fail with the dotted path of the key and the reason.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from memforge.storage.errors import ParamsError

Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda|cuda:\d+)$")]  # where torch (or FAISS) work runs
Precision = Literal["fp32", "bf16", "fp16"]  # numeric format of the computation (autocast for bf16/fp16)
RdzvEndpoint = Annotated[str, Field(pattern=r"^[^\s:]+:\d+$")]  # HOST:PORT of a c10d rendezvous


def _endpoint_for_nodes(endpoint: str | None, info: ValidationInfo) -> str | None:
    """Several nodes meet at a rendezvous endpoint: refuse ``nnodes`` > 1 without one."""
    nodes = info.data.get("nnodes", 1)
    if nodes > 1 and endpoint is None:
        raise ValueError(f"nnodes is {nodes}: name a HOST:PORT every node reaches for their c10d rendezvous")
    return endpoint


class Section(BaseModel):
    """Base of every params section: unknown keys are errors; values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # manifests are strict JSON


class CorpusParams(Section):
    """Where the corpus comes from and how it is read (stage: prepare)."""

    train: list[str] = Field(default_factory=lambda: ["{stdlib}/*.py"])
    validation: list[str] = Field(default_factory=list)
    test: list[str] = Field(default_factory=list)
    validation_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    on_decode_error: Literal["error", "skip"] = "error"
    # per split; auto: 1 MB of the built-in demo corpus ({stdlib}/{site_packages} paths), no cap on yours
    max_bytes: Union[Annotated[int, Field(gt=0)], Literal["auto"], None] = "auto"
    shard_bytes: int = Field(default=256_000, gt=0)
    document_separator: Optional[str] = None  # a regular expression (multi-line) splitting a text file into documents
    tokenizer_sample_bytes: int = Field(default=64_000_000, gt=0)  # train-split bytes a trained tokenizer reads

    @field_validator("document_separator")
    @classmethod
    def _separator_compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern, re.MULTILINE)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern


class DecoderParams(Section):
    """The decoder LM: trained from scratch (``init: null``) or fine-tuned from a HF model directory (local
    path or fsspec URL)."""

    init: Optional[str] = None
    vocab_size: int = Field(default=4096, gt=0)
    n_layer: int = Field(default=4, gt=0)
    n_head: int = Field(default=4, gt=0)
    n_embd: int = Field(default=128, gt=0)
    block_size: int = Field(default=256, gt=0)
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    max_steps: int = Field(default=600, gt=0)
    schedule: Literal["cosine", "linear"] = "cosine"
    checkpoint_every: int = Field(default=100, gt=0)
    seed: int = 0
    precision: Precision = "fp32"
    device: Device = "auto"
    # torch.distributed data parallelism (execution): ranks per node, nodes, and the nodes' c10d rendezvous
    nproc_per_node: int = Field(default=1, gt=0)
    nnodes: int = Field(default=1, gt=0)
    rdzv_endpoint: Optional[RdzvEndpoint] = Field(default=None, validate_default=True)

    @field_validator("n_embd")
    @classmethod
    def _heads_divide_width(cls, n_embd: int, info: ValidationInfo) -> int:
        n_head = info.data.get("n_head")
        if n_head and n_embd % n_head:
            raise ValueError(f"must be divisible by n_head ({n_head})")
        return n_embd


    _rendezvous = field_validator("rdzv_endpoint")(_endpoint_for_nodes)

class EncodeParams(Section):
    """Hidden-state keys: which model, which representation, how they are stored (stage: encode)."""

    model: Optional[str] = None
    layer: int = -1
    representation: Literal["ffn_input", "block_output", "final"] = "ffn_input"
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    block_size: int = Field(default=256, gt=1)
    stride: int = Field(default=128, gt=0)
    batch_size: int = Field(default=8, gt=0)
    chunk_rows: int = Field(default=4096, gt=0)
    shard_chunks: int = Field(default=8, gt=0)
    precision: Precision = "fp32"
    device: Device = "auto"

    @field_validator("stride")
    @classmethod
    def _stride_below_block(cls, stride: int, info: ValidationInfo) -> int:
        block_size = info.data.get("block_size")
        if block_size is not None and stride >= block_size:
            raise ValueError(f"must be smaller than block_size ({block_size})")
        return stride


class IndexParams(Section):
    """The FAISS index (stage: index)."""

    factory: str = "auto"
    flat_threshold: int = Field(default=200_000, gt=0)
    train_points_per_list: int = Field(default=39, ge=39, le=256)
    train_sample: int = Field(default=65536, gt=0)  # for trainable indexes without IVF lists (PQ, SQ, ...)
    nprobe: int = Field(default=32, gt=0)
    merge: Literal["auto", "none", "ondisk"] = "auto"  # auto: ondisk for IVF on local storage
    exact_keys: bool = True  # a copy of the keys in their dtype (2*d bytes/row for float16) for targets.exact_distances
    recall_queries: int = Field(default=256, gt=0)
    recall_k: int = Field(default=64, gt=0)
    seed: int = 0
    threads: int = Field(default=0, ge=0)  # FAISS threads: training (0: all cores); per worker (0: encode's)
    device: Device = "auto"  # FAISS index training and adding, targets and evaluate searches (pipelines.faiss_gpu)


class TargetsParams(Section):
    """kNN distillation targets (stage: targets)."""

    k: int = Field(default=1024, gt=0)
    # Neighbour candidates per query, taken in the index's order (PQ distances) and re-ranked by exact
    # distance; the k nearest are kept. Default (null): k. Recorded as resolved, so `retemper --k` of an
    # artifact equals a fresh run with that k and the same candidates.
    candidates: Optional[int] = Field(default=None, gt=0)
    temperature: float = Field(default=8.0, gt=0)
    # The keep rule of a row's distribution (most probable tokens first; what is not kept is the remainder):
    # at most `width` tokens (null: k), each with probability >= `min_prob` (null: any), stopping once the
    # kept mass reaches `mass` (null: never). Every bound given applies.
    width: Optional[int] = Field(default=32, gt=0)
    min_prob: Optional[float] = Field(default=None, gt=0, le=1)
    mass: Optional[float] = Field(default=None, gt=0, le=1)
    nprobe: Optional[int] = Field(default=None, gt=0)
    exact_distances: bool = True
    exclude_same_document_window: int = Field(default=0, ge=0)
    probs_dtype: Literal["float32", "float16"] = "float32"
    # ids and distances of the k neighbours, for retemper and explain: 4.4 KB per row at k 1024, ~30x the
    # distributions, so off unless asked for
    keep_neighbours: bool = False
    shard_chunks: int = Field(default=8, gt=0)  # rows per work shard = encode.chunk_rows * this
    query_block_rows: int = Field(default=2048, gt=0)  # queries searched and reduced at once per worker

    @field_validator("candidates")
    @classmethod
    def _candidates_cover_k(cls, candidates: int | None, info: ValidationInfo) -> int | None:
        k = info.data.get("k")
        if candidates is not None and k is not None and candidates < k:
            raise ValueError(f"must be at least k ({k})")
        return candidates

    @field_validator("width")
    @classmethod
    def _width_within_k(cls, width: int | None, info: ValidationInfo) -> int | None:
        k = info.data.get("k")
        if width is not None and k is not None and width > k:
            raise ValueError(f"must not exceed k ({k})")
        return width


class MemoryParams(Section):
    """The MLP memory and its training (stage: train-memory)."""

    input_layer: int = -1
    depth: int = Field(default=4, gt=0)
    hidden_mult: int = Field(default=8, gt=0)
    width: int | None = Field(default=None, gt=0)
    activation: Literal["gelu", "relu", "silu"] = "gelu"
    lm_head: Literal["own", "frozen", "tied"] = "tied"
    mode: Literal["auto", "offline", "online"] = "auto"
    alpha: float = Field(default=0.9, ge=0.0, le=1.0)
    batch_size: int = Field(default=512, gt=0)
    learning_rate: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    ema_decay: float | None = Field(default=0.999, ge=0.0, lt=1.0)
    warmup_steps: int = Field(default=50, ge=0)
    max_steps: int = Field(default=4000, gt=0)
    shuffle_buffer_chunks: int = Field(default=4, gt=0)
    checkpoint_every: int = Field(default=200, gt=0)
    seed: int = 0
    precision: Precision = "fp32"
    device: Device = "auto"
    # torch.distributed data parallelism (execution): ranks per node, nodes, and the nodes' c10d rendezvous
    nproc_per_node: int = Field(default=1, gt=0)
    nnodes: int = Field(default=1, gt=0)
    rdzv_endpoint: Optional[RdzvEndpoint] = Field(default=None, validate_default=True)


    _rendezvous = field_validator("rdzv_endpoint")(_endpoint_for_nodes)

class EvaluateParams(Section):
    """Perplexity and speed report (stage: evaluate)."""

    k: int = Field(default=1024, gt=0)
    nprobe: int = Field(default=32, gt=0)
    lambda_grid: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [round(0.05 * i, 2) for i in range(20)], min_length=1)
    temperature_grid: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0], min_length=1)
    memory_temperature_grid: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.8, 0.9, 1.0, 1.1, 1.25, 1.5], min_length=1)
    dev_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    split_seed: int = 0
    batch_size: int = Field(default=4, gt=0)
    precision: Precision = "fp32"
    device: Device = "auto"
    # lm-evaluation-harness tasks (the eval extra) scored with the decoder alone and with decoder + memory at the
    # dev-chosen λ and τ: lm-eval's task names, a local directory of task YAMLs, documents per task (null: all)
    lm_eval_tasks: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    lm_eval_include_path: Optional[str] = None
    lm_eval_limit: Optional[int] = Field(default=None, gt=0)


class ExportParams(Section):
    """The decoder + memory as one Hugging Face model (stage: export): its mixing rule, by default the one
    evaluate chose on dev."""

    lam: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    memory_temperature: Optional[float] = Field(default=None, gt=0.0)


class RuntimeParams(Section):
    """How every stage runs on this machine (never what it writes): local Beam workers, threads, and
    whether models' own code may run."""

    num_workers: int = Field(default=2, gt=0)
    threads_per_worker: int = Field(default=1, gt=0)
    trust_remote_code: bool = False


class FlowParams(Section):
    """The Prefect build flow (``memforge run`` / ``serve``): retries of transient failures, schedule."""

    retries: int = Field(default=2, ge=0)
    retry_delay_s: float = Field(default=10.0, ge=0)
    cron: str = "0 3 * * *"


class Params(Section):
    """The whole of ``params.yaml``."""

    artifacts_dir: str = "artifacts"
    check_inputs: Literal["sample", "full", "off"] = "sample"  # re-hash input files before a stage reads them
    corpus: CorpusParams = Field(default_factory=CorpusParams)
    decoder: DecoderParams = Field(default_factory=DecoderParams)
    encode: EncodeParams = Field(default_factory=EncodeParams)
    index: IndexParams = Field(default_factory=IndexParams)
    targets: TargetsParams = Field(default_factory=TargetsParams)
    memory: MemoryParams = Field(default_factory=MemoryParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    export: ExportParams = Field(default_factory=ExportParams)
    runtime: RuntimeParams = Field(default_factory=RuntimeParams)
    flow: FlowParams = Field(default_factory=FlowParams)

    @model_validator(mode="after")
    def _one_decoder(self) -> "Params":
        """``encode.model`` is the decoder when set (train-decoder is skipped), so a ``decoder.init`` to fine-tune
        beside it could only be ignored: refuse the pair."""
        if self.encode.model and self.decoder.init:
            raise ValueError(f"encode.model ({self.encode.model}) and decoder.init ({self.decoder.init}) are both "
                             "set, but with encode.model set that model is the decoder and train-decoder is skipped, "
                             "so decoder.init would be ignored: to fine-tune decoder.init and encode with the result, "
                             "leave encode.model null; to use encode.model as it is, leave decoder.init null")
        return self

    def section(self, name: str) -> dict[str, Any]:
        """The resolved section ``name`` as plain JSON-able data (what manifests record)."""
        return getattr(self, name).model_dump(mode="json")

    def value(self, dotted: str) -> Any:
        """The JSON-able value of a dotted key (``"targets.k"``) or a whole section (``"targets"``)."""
        node: Any = self.model_dump(mode="json")
        for part in dotted.split("."):
            node = node[part]
        return node


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML would keep the last silently)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_scalar(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        line = key_node.start_mark.line + 1
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice, on lines {first_line[key]} and {line}", key_node.start_mark)
        if key is not None:
            first_line[key] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _yaml(text: str) -> Any:
    """``text`` parsed as YAML: safe tags only, each key of a mapping once."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    reason = error["msg"].removeprefix("Value error, ")
    if not path:  # a rule across sections: its message names the keys
        return reason
    if error["type"] == "extra_forbidden":
        reason = "unknown key"
    elif "input" in error and not isinstance(error["input"], (dict, list)):
        reason = f"{reason} (got {error['input']!r})"
    return f"{path}: {reason}"


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping; errors name ``source`` and every bad dotted key."""
    if data is not None and not isinstance(data, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data or {})
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e) for e in exc.errors())
        raise ParamsError(f"{source}: invalid params:\n  {problems}") from None


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamsError(f"--set {override!r}: expected dotted.key=value")
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _given_or_default(path: str | Path | None) -> str | Path | None:
    return "params.yaml" if path is None and Path("params.yaml").exists() else path


def params_file(path: str | Path | None = None) -> str | None:
    """``path``, else ``./params.yaml`` when present, as an absolute path (flow runs may start elsewhere)."""
    path = _given_or_default(path)
    return None if path is None else str(Path(path).absolute())


def apply_overrides(data: dict[str, Any], overrides: list[str] = (), source: str = "params") -> Params:
    """Validate ``data`` with ``--set`` style ``KEY=VALUE`` overrides applied (``data`` is changed)."""
    for override in overrides:
        _apply_override(data, override)
    if overrides:
        source += " + --set " + " ".join(overrides)
    return parse_params(data, source)


def load_params(path: str | Path | None = None, overrides: list[str] = ()) -> Params:
    """Read ``path`` (default: ./params.yaml when present), apply ``--set`` overrides, validate."""
    source = "defaults"
    data: dict[str, Any] = {}
    path = _given_or_default(path)
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ParamsError(f"{path}: cannot read params file: {exc.strerror}") from None
        try:
            data = _yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ParamsError(f"{path}: top level must be a mapping of sections")
    return apply_overrides(data, overrides, source)
