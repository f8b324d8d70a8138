"""The Hugging Face Hub side of `kdcache export`: the base model's hub id, and the upload of the exported folder.

A run trained from a local folder knows its base only as a path (``/data/models/Qwen2.5-1.5B``), which means
nothing on another machine. :func:`base_model_id` finds the hub id when it can be known, in this order: the id given
(``--base-model-id``), the base itself when it is a hub id, the run's ``student`` (train_config.json) when it is one,
a Hugging Face cache snapshot path (``.../models--ORG--NAME/snapshots/REV`` is ``ORG/NAME``), and the
``_name_or_path`` an older transformers wrote into the base's config.json. :func:`push_to_hub` uploads through
huggingface_hub (``HfApi.create_repo`` and ``upload_folder``), turning its failures into one-line errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kdcache.errors import BadInputError

_SNAPSHOT = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\]")


def is_hub_id_shape(name: str) -> bool:
    """True when `name` is shaped like a hub id (``org/name`` or ``name``), as huggingface_hub validates one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_id(name: str | None) -> bool:
    """True when `name` is shaped like a hub model id and is not an existing local path."""
    return bool(name) and not Path(name).expanduser().exists() and is_hub_id_shape(name)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def base_model_id(base: str, run: Path | None = None, given: str | None = None) -> str | None:
    """The hub id of the base model `base` (a hub id or a local folder) of the run folder `run`, or None when it
    cannot be known; `given` (``--base-model-id``) wins and must be a valid id."""
    if given is not None:
        if not is_hub_id(given):
            raise BadInputError(f"--base-model-id must be a hub model id such as Qwen/Qwen2.5-1.5B, got {given!r}")
        return given
    student = _read_json(run / "train_config.json").get("student") if run is not None else None
    snapshot = _SNAPSHOT.search(str(Path(base).expanduser().resolve()))
    candidates = [base, student, snapshot.group("repo").replace("--", "/") if snapshot else None,
                  _read_json(Path(base) / "config.json").get("_name_or_path")]
    return next((name for name in candidates if is_hub_id(name)), None)


def check_repo_id(repo: str) -> None:
    """Refuse a --push-to-hub value that is not a hub repo id (before any work is done)."""
    if not is_hub_id_shape(repo):
        raise BadInputError(f"--push-to-hub must be a hub repo id such as your-name/student, got {repo!r}")


def push_to_hub(folder: str | Path, repo: str, private: bool = False) -> str:
    """Create the model repo `repo` (if new) and upload `folder` to it; returns the commit's URL. Offline mode, a
    missing token and the hub's refusals are BadInputErrors of one line (the folder is already complete)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    check_repo_id(repo)
    later = f"the export in {folder} is complete: upload it later with `hf upload {repo} {folder}`"
    api = HfApi()
    try:
        api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                                   commit_message="Upload a student distilled with kdcache")
    except OfflineModeIsEnabled:
        raise BadInputError(f"cannot push to the hub repo {repo}: HF_HUB_OFFLINE is set (offline mode); unset it, "
                            f"or {later}") from None
    except LocalTokenNotFoundError:
        raise BadInputError(f"cannot push to the hub repo {repo}: no hub token (run `hf auth login` or set "
                            f"HF_TOKEN); {later}") from None
    except (HfHubHTTPError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadInputError(f"cannot push to the hub repo {repo}: {reason}; {later}") from None
    return str(getattr(commit, "commit_url", commit))

