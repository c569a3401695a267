"""Models named by a Hugging Face Hub id (``Qwen/Qwen3-0.6B``), found through huggingface_hub's cache.

:func:`~pagedattn.models.loader.resolve_model_source` asks here only for a reference that is no
local path, so a folder or file of the same spelling always wins.  ``snapshot_download`` returns
the model's snapshot folder from the cache, downloading what is missing; huggingface_hub itself
honours ``HF_HUB_OFFLINE=1`` (the cache only, never the network), ``HF_HOME`` / ``HF_HUB_CACHE``
(where the cache is) and ``HF_TOKEN`` (gated and private models).  ``download_dir`` is a cache
folder of its own, as vLLM's option of that name is.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# What the loader and the tokenizer read; nothing else of a repository is fetched (other weight
# formats, ONNX exports, images of its model card).
CONFIG_PATTERNS = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")
WEIGHT_PATTERNS = ("*.safetensors",)


def is_hub_id(ref: str) -> bool:
    """``name`` or ``org/name`` by the Hub's rules; a ``.gguf`` name is a missing file, not an id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if ref.lower().endswith(".gguf"):
        return False
    try:
        validate_repo_id(ref)
    except HFValidationError:
        return False
    return True


def snapshot_folder(repo_id: str, download_dir: str | None = None, weights: bool = True) -> Path:
    """The local folder of Hub model ``repo_id`` (its files fetched into the cache if missing).
    ``weights=False`` (dummy weights) fetches only the configuration and tokenizer files."""
    from huggingface_hub import snapshot_download

    patterns = list(CONFIG_PATTERNS + (WEIGHT_PATTERNS if weights else ()))
    try:
        folder = Path(snapshot_download(repo_id, cache_dir=download_dir, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub's errors differ between its versions; each is told apart below
        raise ValueError(_failure(repo_id, download_dir, e)) from None
    logger.info("model %s: %s", repo_id, folder)
    return folder


def _failure(repo_id: str, download_dir: str | None, e: Exception) -> str:
    """What went wrong, in the words a user needs (the cache's place, offline mode, a token)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    head = f"model: {repo_id!r} is not a local path"
    if isinstance(e, GatedRepoError):
        return f"{head}, and the Hub model of that id is gated: accept its terms on the Hub and set HF_TOKEN"
    if isinstance(e, RepositoryNotFoundError):
        return f"{head}, and the Hub has no model of that id (a private one needs HF_TOKEN)"
    if isinstance(e, LocalEntryNotFoundError):
        cache = download_dir or constants.HF_HUB_CACHE
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        return f"{head}, nor a model in the Hugging Face cache at {cache}; {why}"
    return f"{head}; fetching it from the Hugging Face Hub failed: {type(e).__name__}: {e}"
