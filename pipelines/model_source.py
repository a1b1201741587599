"""A model or tokenizer named by a param (``encode.model``, ``decoder.init``): a local directory or an fsspec
URL. memforge never downloads from the Hugging Face Hub at run time, so a name that is not there is refused
with what it looks like and how to fetch it for offline use."""
from __future__ import annotations

import os
import re

from memforge.storage import fs
from memforge.storage.errors import MemforgeError

# what the Hub accepts as a repository id: "name" or "owner/name" of letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def require(value: str, key: str) -> None:
    """Refuse ``value`` of param ``key`` when it is a local path that does not exist, saying whether it looks like
    a Hub id and how to fetch one for offline use."""
    if not fs.is_local(value) or os.path.exists(fs.normalize(value)):
        return
    where = fs.normalize(value)
    if _HUB_ID.match(value) and not value.startswith("."):
        local = f"models/{value.rsplit('/', 1)[-1]}"
        raise MemforgeError(
            f"{key}: {value!r} is not a local directory ({where} does not exist). It looks like a Hugging Face Hub "
            f"id, and memforge reads models only from paths and URLs, never downloading at run time: fetch it once "
            f"where there is network, e.g. `hf download {value} --local-dir {local}` (or "
            f"huggingface_hub.snapshot_download), then set {key}={local} (a local path or an s3:// URL of that copy)")
    raise MemforgeError(f"{key}: {value}: no such directory ({where}); name a Hugging Face model directory "
                        "(a local path or an fsspec URL)")
