"""Corpus sources: expanding paths, globs and URLs into files, capped at ``corpus.max_bytes``, and the split
each document belongs to (``documents`` reads them). ``{stdlib}`` in a path stands for this Python's standard library
directory, which is how the demo corpus exists on every machine without network; ``{site_packages}``
for the environment's installed packages (e.g. their ``*.dist-info/METADATA`` descriptions: English
prose and Markdown, a second corpus every install has).
"""
from __future__ import annotations

import hashlib
import io
import logging
import sysconfig
from dataclasses import dataclass, replace

from fsspec.utils import infer_compression

from memforge.storage import fs
from memforge.storage.errors import MemforgeError
from memforge.storage.params import CorpusParams

log = logging.getLogger("memforge")
GLOB_CHARS = "*?["
_CUT_BLOCK = 1 << 20  # bytes read at a time looking for the last line end before corpus.max_bytes
DEMO_MAX_BYTES = 1_000_000  # corpus.max_bytes auto: the cap of each split of the built-in demo corpus
PLACEHOLDERS = ("{stdlib}", "{site_packages}")
FORMATS_BY_SUFFIX = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


class CorpusError(MemforgeError):
    """Bad corpus input; the message names the file (and byte offset or line) at fault."""


@dataclass(frozen=True)
class SourceFile:
    """One input file: its index in the sorted file list, URI, name (path below the pattern's fixed
    prefix, the same on every machine), format, size, split (None: split by document), ``limit``: the
    bytes read from its start when ``corpus.max_bytes`` cuts it (text and JSONL: up to a line end; Parquet:
    the rows whose text fits), None when it is read whole, and ``compression`` (gzip, bz2, zstd, xz, ...:
    fsspec's, inferred from the suffix), None for a plain file. A compressed file's size and offsets are
    those of its decompressed bytes; it is read from its start, in one piece, and never cut."""

    index: int
    uri: str
    name: str
    format: str
    size: int
    split: str | None
    limit: int | None = None
    compression: str | None = None

    @property
    def taken(self) -> int:
        """Bytes of the file that are read (its size unless ``corpus.max_bytes`` cuts it)."""
        return self.size if self.limit is None else self.limit

    def open(self):
        """The file's (decompressed) bytes as a binary file object (zstd's reader, which reads but cannot
        seek, buffered so that it reads lines)."""
        filesystem, path = fs.filesystem(self.uri)
        handle = filesystem.open(path, "rb", compression=self.compression)
        return handle if isinstance(handle, io.BufferedIOBase) or handle.seekable() else io.BufferedReader(handle)


def _expand(pattern: str, where: str) -> list[tuple[str, str, int]]:
    """(uri, name, size) of every file matching ``pattern``."""
    paths = sysconfig.get_paths()
    pattern = pattern.replace("{stdlib}", paths["stdlib"]).replace("{site_packages}", paths["purelib"])
    filesystem, path = fs.filesystem(pattern)
    if filesystem.isdir(path):  # a directory: every file below it
        fixed = path.rstrip("/") + "/"
        matches = sorted(filesystem.find(path))
    elif filesystem.exists(path) or not any(ch in path for ch in GLOB_CHARS):  # an existing path is literal,
        fixed = path                                                           # even with "[v1]" in its name
        matches = [path] if filesystem.exists(path) else []
    else:
        fixed = path[:min(path.index(ch) for ch in GLOB_CHARS if ch in path)]
        matches = sorted(filesystem.glob(path))
    base = fixed.rsplit("/", 1)[0] + "/" if "/" in fixed else ""
    files = [m for m in matches if filesystem.isfile(m)]
    if not files:
        raise CorpusError(f"{where}: no file matches {pattern!r}")
    protocol = filesystem.protocol if isinstance(filesystem.protocol, str) else filesystem.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    return [(prefix + f.lstrip("/") if prefix else f, f[len(base):] if f.startswith(base) else f, filesystem.size(f))
            for f in files]


def _format(uri: str, configured: str, compression: str | None) -> str:
    """The configured format, or for ``auto`` the one the suffix says (under a compression suffix)."""
    if configured != "auto":
        return configured
    name = uri.rsplit("/", 1)[-1].lower()
    if compression:
        name = name.rsplit(".", 1)[0]
    suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
    return FORMATS_BY_SUFFIX.get(suffix, "text")


def _decompressed(file: SourceFile) -> SourceFile:
    """``file`` with the size of its decompressed bytes (read through once); a file that does not decompress
    is a CorpusError naming it."""
    size = 0
    try:
        with file.open() as handle:
            while block := handle.read(_CUT_BLOCK):
                size += len(block)
    except (OSError, EOFError, ValueError) as exc:
        raise CorpusError(f"{file.uri}: cannot read it as {file.compression}: {type(exc).__name__}: {exc}") from None
    return replace(file, size=size)


class SourceFiles(list):
    """The input files (``SourceFile`` s) and ``capped``: per split key, what ``corpus.max_bytes`` left out (the
    cap, bytes read, bytes and files left out, the file it cut); empty when nothing was."""

    def __init__(self, files: list[SourceFile], capped: dict[str, dict]):
        super().__init__(files)
        self.capped = capped


def split_cap(max_bytes: int | str | None, patterns: list[str]) -> int | None:
    """The byte cap of a split read from ``patterns``: ``max_bytes`` itself, or for ``auto`` the demo's cap when
    every pattern is the built-in demo corpus's (a placeholder path) and none for a corpus of your own."""
    if max_bytes != "auto":
        return max_bytes
    return DEMO_MAX_BYTES if all(any(p in pattern for p in PLACEHOLDERS) for pattern in patterns) else None


def source_files(params: CorpusParams) -> SourceFiles:
    """All input files, sorted per split; each split is cut at its cap (``split_cap``): the file that reaches it
    is read up to its last line end inside it (Parquet: its rows that fit), later files are left out, and what
    was left out is logged and returned (``SourceFiles.capped``)."""
    groups = [("train" if params.validation else None, "corpus.train", params.train)]
    if params.validation:
        groups.append(("validation", "corpus.validation", params.validation))
    if params.test:
        groups.append(("test", "corpus.test", params.test))
    if not params.train:
        raise CorpusError("corpus.train: no sources given (list paths, globs or URLs)")
    files: list[SourceFile] = []
    capped: dict[str, dict] = {}
    owner: dict[str, str] = {}  # uri -> the split key that named it first
    for split, key, patterns in groups:  # each split has its own max_bytes budget
        seen: dict[str, tuple[str, int]] = {}
        for i, pattern in enumerate(patterns):
            for uri, name, size in _expand(pattern, f"{key}[{i}]"):
                if owner.setdefault(uri, key) != key:  # its tokens would be searched and scored alike
                    raise CorpusError(f"{key}[{i}]: {uri} is also a file of {owner[uri]}; a file belongs to one "
                                      "split")
                seen.setdefault(uri, (name, size))
        found = []
        for uri, (name, size) in sorted(seen.items()):
            compression = infer_compression(uri)
            file = SourceFile(0, uri, name, _format(uri, params.format, compression), size, split,
                              compression=compression)
            if compression and file.format == "parquet":
                raise CorpusError(f"{key}: {uri}: a {compression}-compressed Parquet file cannot be read in place; "
                                  "Parquet compresses its own columns: store it uncompressed")
            found.append(_decompressed(file) if compression else file)
        kept, left_out = _capped(found, key, split_cap(params.max_bytes, patterns))
        files += [replace(f, index=len(files) + i) for i, f in enumerate(kept)]
        if left_out:
            capped[key] = left_out
    return SourceFiles(files, capped)


def _capped(found: list[SourceFile], key: str, max_bytes: int | None) -> tuple[list[SourceFile], dict | None]:
    """The files of one split within ``max_bytes`` (None: all), the last one cut at a line end, and what was left
    out (None when nothing was); logs it."""
    if max_bytes is None:
        return found, None
    kept, total = [], 0
    for position, file in enumerate(found):
        if total + file.size <= max_bytes:
            kept.append(file)
            total += file.size
            continue
        cut = _cut(file, max_bytes - total)
        if cut.limit:
            kept.append(cut)
            total += cut.limit
        elif not kept and file.compression:
            raise CorpusError(f"{key}: {file.uri}: a compressed file is read whole or not at all, and its "
                              f"{file.size:,} decompressed bytes exceed corpus.max_bytes ({max_bytes:,} bytes); "
                              "raise corpus.max_bytes")
        elif not kept:
            raise CorpusError(f"{key}: {file.uri}: its first line is longer than corpus.max_bytes "
                              f"({max_bytes:,} bytes), so nothing of the split fits; raise corpus.max_bytes or "
                              "break the file into lines")
        rest = found[position + 1:]
        log.warning("%s: corpus.max_bytes (%s bytes) reached: %s bytes read; left out %s bytes of %s%s", key,
                    f"{max_bytes:,}", f"{total:,}", f"{file.size - (cut.limit or 0):,}", file.uri,
                    f" and {len(rest)} more files ({sum(f.size for f in rest):,} bytes)" if rest else "")
        return kept, {"max_bytes": max_bytes, "read_bytes": total,
                      "left_out_bytes": file.size - (cut.limit or 0) + sum(f.size for f in rest),
                      "left_out_files": len(rest) + (0 if cut.limit else 1),
                      "cut_file": file.uri if cut.limit else None}
    return kept, None


def _cut(file: SourceFile, budget: int) -> SourceFile:
    """``file`` read up to its last line end within ``budget`` bytes (limit 0: not even one line fits, or a
    compressed file, which is never cut); Parquet is cut where its rows' text exceeds the budget
    (``documents.parquet_documents``)."""
    if file.compression:
        return replace(file, limit=0)
    if file.format == "parquet" or budget <= 0:
        return replace(file, limit=max(budget, 0))
    filesystem, path = fs.filesystem(file.uri)
    with filesystem.open(path, "rb") as handle:  # search backwards from the budget, a block at a time
        end = budget
        while end > 0:
            start = max(0, end - _CUT_BLOCK)
            handle.seek(start)
            line_end = handle.read(end - start).rfind(b"\n")
            if line_end >= 0:
                return replace(file, limit=start + line_end + 1)
            end = start
    return replace(file, limit=0)


def document_split(file: SourceFile, doc_key: int, validation_fraction: float) -> str:
    """Deterministic split of one document: its file's split, or a hash of (file name, document key: the byte
    offset where it starts, a Parquet row's index), the same however the file is cut into ranges."""
    if file.split is not None:
        return file.split
    digest = hashlib.sha256(f"{file.name}\0{doc_key}".encode("utf-8", "surrogateescape")).digest()
    return "validation" if int.from_bytes(digest[:8], "big") / 2**64 < validation_fraction else "train"
