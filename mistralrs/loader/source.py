"""Where a model's files are: a local directory or a Hugging Face hub repository.

`resolve_token` turns the reference's `token_source` strings into a token; `ModelSource` hands out local
paths for a model's files, downloading them through `huggingface_hub` when the model id is not a local
directory. The environment is read at call time (not at import), so `HF_HUB_CACHE`, `HF_HOME`,
`HF_TOKEN_PATH` and `HF_HUB_OFFLINE` set after import are honoured.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

TOKEN_SOURCE_FORMS = ('"literal:<token>"', '"env:<VAR>"', '"path:<file>"', '"cache"', '"none"')


def _hf_home() -> str:
    """The Hugging Face home folder: `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else ~/.cache/huggingface."""
    if os.environ.get("HF_HOME"):
        return os.path.expanduser(os.environ["HF_HOME"])
    cache_root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_root, "huggingface")


def hub_cache_dir() -> str:
    """The hub cache folder: `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else `<HF_HOME>/hub`."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    return os.path.join(_hf_home(), "hub")


def hub_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or the older `TRANSFORMERS_OFFLINE`) is set to a true value."""
    truthy = {"1", "true", "yes", "on"}
    return any(os.environ.get(var, "").strip().lower() in truthy for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _read_token_file(path: str, what: str) -> str | None:
    """The stripped content of a token file, or None (with a warning) when it is missing or empty."""
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except FileNotFoundError:
        logger.warning("%s: token file %s does not exist; continuing without a Hugging Face token", what, path)
        return None
    if not token:
        logger.warning("%s: token file %s is empty; continuing without a Hugging Face token", what, path)
        return None
    return token


def resolve_token(token_source: str) -> str | None:
    """Resolve a `token_source` string to a Hugging Face token (None: no token).

    Forms: "literal:<tok>", "env:<VAR>", "path:<file>", "cache" (the HF token file: `HF_TOKEN_PATH`, else
    `<HF_HOME>/token`) and "none". A missing variable or file is not an error: a warning is logged and the
    load carries on without a token, as the reference does.
    """
    if not isinstance(token_source, str):
        raise ValueError(f"token_source must be a string, one of {', '.join(TOKEN_SOURCE_FORMS)}; got {token_source!r}")
    if token_source == "none":
        return None
    if token_source == "cache":
        token_path = os.path.expanduser(os.environ.get("HF_TOKEN_PATH") or os.path.join(_hf_home(), "token"))
        if not os.path.exists(token_path):
            return None
        return _read_token_file(token_path, "token_source='cache'")
    kind, sep, value = token_source.partition(":")
    if sep and kind == "literal":
        return value or None
    if sep and kind == "env":
        token = os.environ.get(value)
        if not token:
            logger.warning("token_source=%r: environment variable %s is not set; continuing without a token",
                           token_source, value)
            return None
        return token
    if sep and kind == "path":
        return _read_token_file(os.path.expanduser(value), f"token_source={token_source!r}")
    raise ValueError(f"token_source must be one of {', '.join(TOKEN_SOURCE_FORMS)}; got {token_source!r}")


class ModelFileNotFoundError(FileNotFoundError, ValueError):
    """A model file that the local directory or hub repository does not have (a ValueError for load errors)."""


class ModelSource:
    """The files of one model: a local directory used as is, or a hub repo id read through `huggingface_hub`.

    Hub files go to the hub cache (`HF_HUB_CACHE`); with `HF_HUB_OFFLINE=1` only that cache is read and a
    file missing from it is a clear error.
    """

    def __init__(self, model_id: str, *, token: str | None, revision: str | None = None):
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"model_id must be a local directory or a hub repo id ('org/name'); got {model_id!r}")
        self.model_id = model_id  # the id as given: a local directory or a hub repo id
        self.token = token  # HF token for the hub (None: anonymous)
        self.revision = revision  # hub branch, tag or commit (None: "main")
        self.local_dir = os.path.expanduser(model_id) if os.path.isdir(os.path.expanduser(model_id)) else None

    def __repr__(self) -> str:
        return f"ModelSource({self.model_id!r}, revision={self.revision!r})"

    def get(self, filename: str) -> str:
        """The local path of `filename`, downloading it from the hub when needed."""
        path = self.maybe_get(filename)
        if path is None:
            where = "local directory" if self.local_dir is not None else "hub repository"
            raise ModelFileNotFoundError(f"model {self.model_id!r} ({where}) has no file {filename!r}")
        return path

    def maybe_get(self, filename: str) -> str | None:
        """The local path of `filename`, or None when the model has no such file."""
        if self.local_dir is not None:
            path = os.path.join(self.local_dir, filename)
            return path if os.path.isfile(path) else None
        return self._hub_download(filename)

    def list_files(self) -> list[str]:
        """All file names of the model, relative to its root, sorted."""
        if self.local_dir is not None:
            return _walk_files(self.local_dir)
        if hub_offline():
            return _walk_files(self._cached_snapshot_dir())
        from huggingface_hub import list_repo_files
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        try:
            return sorted(list_repo_files(self.model_id, revision=self.revision, token=self.token or False))
        except (HfHubHTTPError, HFValidationError) as err:
            raise self._hub_error(err, "list the files") from err

    def _hub_download(self, filename: str) -> str | None:
        """Download (or find in the cache) one hub file; None when the repository lacks it."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, HFValidationError,
                                            LocalEntryNotFoundError)

        offline = hub_offline()
        try:
            return hf_hub_download(self.model_id, filename, revision=self.revision, token=self.token or False,
                                   cache_dir=hub_cache_dir(), local_files_only=offline)
        except LocalEntryNotFoundError as err:
            if offline and self._cached_file_is_absent(filename):
                return None
            raise self._hub_error(err, f"get {filename!r}") from err
        except EntryNotFoundError:
            return None
        except (HfHubHTTPError, HFValidationError) as err:
            raise self._hub_error(err, f"get {filename!r}") from err

    def _hub_error(self, err: Exception, action: str) -> ValueError:
        """A ValueError that says why the hub could not serve this model."""
        from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)

        revision = self.revision or "main"
        if isinstance(err, HFValidationError):
            return ValueError(f"model {self.model_id!r} is neither a local directory nor a valid hub repo id: {err}")
        if isinstance(err, GatedRepoError):
            return ValueError(f"model {self.model_id!r} is gated: accept its terms on the hub and pass a token "
                              f"(token_source): {err}")
        if isinstance(err, RepositoryNotFoundError):
            return ValueError(f"model {self.model_id!r} is neither a local directory nor a hub repository "
                              f"you can access: {err}")
        if isinstance(err, RevisionNotFoundError):
            return ValueError(f"model {self.model_id!r} has no revision {revision!r}: {err}")
        if isinstance(err, LocalEntryNotFoundError) and hub_offline():
            return ValueError(f"model {self.model_id!r} is not a local directory, HF_HUB_OFFLINE is set and the "
                              f"hub cache {hub_cache_dir()} does not have it (revision {revision}); could not "
                              f"{action}")
        return ValueError(f"could not {action} of model {self.model_id!r} (revision {revision}) from the hub "
                          f"or the hub cache {hub_cache_dir()}: {err}")

    def _cached_file_is_absent(self, filename: str) -> bool:
        """Offline: True when the model's cached snapshot exists but has no `filename` (the file is missing,
        not the model)."""
        try:
            snapshot = self._cached_snapshot_dir()
        except ValueError:
            return False
        return not os.path.exists(os.path.join(snapshot, filename))

    def _cached_snapshot_dir(self) -> str:
        """The folder of the cached snapshot for this model and revision (offline listing)."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return snapshot_download(self.model_id, revision=self.revision, token=self.token or False,
                                     cache_dir=hub_cache_dir(), local_files_only=True)
        except (LocalEntryNotFoundError, HFValidationError) as err:
            raise self._hub_error(err, "list the files") from err


def _walk_files(root: str) -> list[str]:
    """Relative paths (with '/') of every file under `root`, sorted; hidden folders such as .git skipped."""
    names = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        for name in files:
            names.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(names)
