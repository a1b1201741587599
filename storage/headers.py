"""What a typed file says it holds, read from its header alone, never its data: a ``.npy`` file's dtype, shape
and order; a Parquet file's Arrow schema and row count (its footer); a Zarr v3 array's dtype, shape, chunks,
shards and codecs (its ``zarr.json``).

Manifests record the headers of every ``.npy`` and Parquet file (``headers``) and of every Zarr array
(``arrays``); ``memforge verify`` and the input checks compare each file's header with them. Whatever a manifest
says, a header that needs pickle to read its data is refused: object dtypes, Zarr data types other than fixed-size
numbers, Zarr codecs memforge does not write, Arrow extension types (Python-defined).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from memforge.storage import fs
from memforge.storage.errors import ArtifactError

TYPED_SUFFIXES = (".npy", ".parquet")  # files whose headers a manifest records under ``headers``
ZARR_METADATA = "zarr.json"
_NUMBERS = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                      "float16", "float32", "float64", "complex64", "complex128"})
_ZARR_CODECS = frozenset({"bytes", "blosc", "zstd", "gzip", "crc32c", "transpose", "sharding_indexed"})
_NPY_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_EXTENSION_KEY = b"ARROW:extension:name"


def npy_header(uri: str, name: str | None = None) -> dict:
    """``{"dtype", "shape", "fortran_order"}`` of the ``.npy`` file at ``uri`` (messages name it ``name``);
    refuses object dtypes."""
    name = name or uri
    files, path = fs.filesystem(uri)
    try:
        with files.open(path, "rb", block_size=1 << 16) as handle:
            version = np.lib.format.read_magic(handle)
            if version not in _NPY_READERS:
                raise ValueError(f"format version {version[0]}.{version[1]} is not 1.0 or 2.0")
            shape, fortran_order, dtype = _NPY_READERS[version](handle)
    except ValueError as exc:
        raise ArtifactError(f"{name}: not a readable .npy header ({exc})") from None
    if dtype.hasobject:
        raise ArtifactError(f"{name}: dtype {dtype} holds Python objects, which only pickle reads: refused "
                            "(memforge never unpickles)")
    return {"dtype": str(dtype), "shape": list(shape), "fortran_order": fortran_order}


def _extension_fields(fields: list[pa.Field], prefix: str = "") -> Iterator[str]:
    for field in fields:
        if isinstance(field.type, pa.ExtensionType) or _EXTENSION_KEY in (field.metadata or {}):
            yield prefix + field.name
        yield from _extension_fields([field.type.field(i) for i in range(field.type.num_fields)],
                                     f"{prefix}{field.name}.")


def parquet_header(uri: str, name: str | None = None) -> dict:
    """``{"schema", "rows"}`` of the Parquet file at ``uri`` from its footer (the schema as ``name: type``
    lines); refuses Arrow extension types."""
    name = name or uri
    files, path = fs.filesystem(uri)
    try:
        with pq.ParquetFile(path, filesystem=files) as part:
            schema, rows = part.schema_arrow, part.metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise ArtifactError(f"{name}: not a readable Parquet footer ({exc})") from None
    extensions = list(_extension_fields(list(schema)))
    if extensions:
        raise ArtifactError(f"{name}: column {extensions[0]} has an Arrow extension type (Python-defined): refused")
    return {"schema": schema.to_string(show_field_metadata=False, show_schema_metadata=False).splitlines(),
            "rows": rows}


def _codec_names(codecs: list) -> Iterator[str]:
    for codec in codecs:
        yield codec["name"]
        config = codec.get("configuration") or {}
        yield from _codec_names([*config.get("codecs", []), *config.get("index_codecs", [])])


def zarr_header(metadata: dict, name: str) -> dict:
    """``{"shape", "dtype", "chunks", "shards"}`` of a Zarr v3 array from its ``zarr.json`` content (as
    ``ZarrRows.describe`` records them); refuses data types other than fixed-size numbers and unknown codecs."""
    try:
        if metadata.get("zarr_format") != 3 or metadata.get("node_type") != "array":
            raise ValueError(f"zarr_format {metadata.get('zarr_format')!r}, node_type {metadata.get('node_type')!r}")
        dtype, codecs = metadata["data_type"], metadata["codecs"]
        if not isinstance(dtype, str) or dtype not in _NUMBERS:
            raise ArtifactError(f"{name}: data type {dtype!r} is not a fixed-size number (object, string and "
                                "extension types can hold what only pickle reads): refused")
        unknown = sorted(set(_codec_names(codecs)) - _ZARR_CODECS)
        if unknown:
            raise ArtifactError(f"{name}: codec {unknown[0]!r} is not one memforge writes "
                                f"({', '.join(sorted(_ZARR_CODECS))}): refused")
        grid = list(metadata["chunk_grid"]["configuration"]["chunk_shape"])
        sharding = next((c["configuration"] for c in codecs if c["name"] == "sharding_indexed"), None)
        chunks, shards = (list(sharding["chunk_shape"]), grid) if sharding else (grid, None)
        return {"shape": list(metadata["shape"]), "dtype": dtype, "chunks": chunks, "shards": shards}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"{name}: not a Zarr v3 array's metadata ({type(exc).__name__}: {exc})") from None


def file_header(uri: str, name: str | None = None) -> dict:
    """The header of the ``.npy`` or Parquet file at ``uri`` (see ``npy_header``, ``parquet_header``)."""
    return (npy_header if uri.endswith(".npy") else parquet_header)(uri, name)


def describe_files(root: str, files: list[str]) -> dict[str, dict]:
    """The headers of the ``.npy`` and Parquet files among ``files`` (relative to ``root``), for a manifest."""
    return {rel: file_header(fs.join(root, rel), rel) for rel in files if rel.endswith(TYPED_SUFFIXES)}


def _differences(found: dict, recorded: dict) -> str | None:
    """``key is X, manifest says Y`` for each key the manifest records with another value, or None."""
    wrong = [f"{key} is {found.get(key)}, manifest says {value}" for key, value in recorded.items()
             if found.get(key) != value]
    return "; ".join(wrong) or None


def _check_typed_files(uri: str, manifest: dict, present: set[str]) -> Iterator[str]:
    recorded = manifest.get("headers")
    for rel in sorted(r for r in manifest.get("files", {}) if r.endswith(TYPED_SUFFIXES) and r in present):
        try:
            found = file_header(fs.join(uri, rel), rel)
        except ArtifactError as exc:
            yield str(exc)
            continue
        if recorded is None:  # published by a memforge that recorded no headers: the refusals above still hold
            continue
        if rel not in recorded:
            yield f"{rel}: its header is not recorded in the manifest (headers)"
        elif (wrong := _differences(found, recorded[rel])) is not None:
            yield f"{rel}: {wrong}"


def _check_zarr_arrays(uri: str, manifest: dict, present: set[str]) -> Iterator[str]:
    arrays = manifest.get("arrays", {})
    for name, recorded in arrays.items():
        rel = f"{name}/{ZARR_METADATA}"
        if rel not in present:
            yield f"{name}: array missing ({rel} not found)"
            continue
        try:
            found = zarr_header(fs.read_json(fs.join(uri, rel)), name)
        except ArtifactError as exc:
            yield str(exc)
            continue
        if (wrong := _differences(found, recorded)) is not None:
            yield f"{name}: {wrong}"
    groups = {name.rpartition("/")[0] for name in arrays}
    for rel in sorted(manifest.get("files", {})):
        node = rel[:-len(ZARR_METADATA)].rstrip("/")
        if rel.rpartition("/")[2] != ZARR_METADATA or rel not in present or node in arrays or node in groups:
            continue
        try:
            metadata = fs.read_json(fs.join(uri, rel))
        except ArtifactError as exc:
            yield str(exc)
            continue
        if isinstance(metadata, dict) and metadata.get("node_type") == "array":
            yield f"{node or '.'}: a Zarr array the manifest does not describe (arrays)"


def check_headers(uri: str, manifest: dict, present: set[str]) -> Iterator[str]:
    """Problems of the typed files among ``present`` (relative paths) of the artifact at ``uri``: headers that are
    refused, or that differ from what the manifest records; Zarr arrays that it does not describe."""
    yield from _check_typed_files(uri, manifest, present)
    yield from _check_zarr_arrays(uri, manifest, present)
