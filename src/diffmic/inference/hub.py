"""Exported model folders on the Hugging Face Hub.

``Predictor.from_pretrained("org/name")`` and ``diffmic predict --model org/name`` fetch a model
folder written by ``diffmic export`` with huggingface_hub's ``snapshot_download`` (into the
Hugging Face cache: ``HF_HUB_CACHE`` / ``HF_HOME``; ``revision`` pins a branch, tag or commit) and load
it with :func:`~diffmic.inference.export.load_model_folder`, whose checks all apply (schema, sizes,
the SHA-256 of the weights against ``config.json``). Offline (``HF_HUB_OFFLINE=1``, or no network) a
cached snapshot is used; a model that is not cached is a clear :class:`ExportError`.

``diffmic export ... --push-to-hub org/name`` (:func:`push_to_hub`) uploads the folder with
``HfApi.upload_folder`` in one commit, with a ``README.md`` (the Hub's model card: metadata
header and ``MODEL_CARD.md``). Needs ``huggingface_hub`` (installed with timm; the ``hub`` extra
names it).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from diffmic import __version__
from diffmic.inference.export import CARD, CONFIG, WEIGHTS, ExportError, is_model_folder, load_model_folder

__all__ = ["HUB_FILES", "is_repo_id", "download_model", "resolve_model", "hub_card", "push_to_hub"]

#: the files of a model folder on the Hub (ONNX graphs where it has them)
HUB_FILES = (CONFIG, WEIGHTS, CARD, "README.md", "*.onnx")
_EXTRA = "pip install 'diffmic[hub]'"
#: a Hub model id: ``org/name`` (letters, digits, ``-``, ``_``, ``.``; at most 96 characters each)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_repo_id(ref: str) -> bool:
    """Whether ``ref`` has the form of a Hub model id (``org/name``)."""
    return bool(_REPO_ID.fullmatch(str(ref))) and ".." not in str(ref)


def _hub():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ExportError(
            f"loading or pushing a model on the Hugging Face Hub needs huggingface_hub ({_EXTRA})"
        ) from exc
    return huggingface_hub


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def download_model(
    repo_id: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local snapshot folder of the model ``repo_id`` at ``revision`` (default: ``main``),
    downloaded into the Hugging Face cache unless it is there already; offline, the cached one."""
    hub = _hub()
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    offline = local_files_only or _offline()
    try:
        path = hub.snapshot_download(
            repo_id,
            repo_type="model",
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=list(HUB_FILES),
            token=token,
            library_name="diffmic",
            library_version=__version__,
        )
    except RevisionNotFoundError as exc:
        raise ExportError(f"the Hub model '{repo_id}' has no revision {revision!r} (a branch, tag or commit)") from exc
    except RepositoryNotFoundError as exc:
        raise ExportError(
            f"no model '{repo_id}' on the Hugging Face Hub (or it is private or gated: log in with "
            "`hf auth login` or set HF_TOKEN)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        from huggingface_hub import constants

        where = cache_dir or constants.HF_HUB_CACHE
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub cannot be reached"
        raise ExportError(
            f"the model '{repo_id}'{rev} is not in the Hugging Face cache ({where}) and {why}. Fetch it once "
            "with network access (it is then cached), point HF_HUB_CACHE at a cache that holds it, or pass a "
            "local model folder written by `diffmic export`"
        ) from exc
    except HfHubHTTPError as exc:
        raise ExportError(f"cannot fetch the model '{repo_id}'{rev} from the Hugging Face Hub: {exc}") from exc
    folder = Path(path)
    if not is_model_folder(folder):
        raise ExportError(
            f"the Hub repository '{repo_id}'{rev} holds no diffmic model folder ({CONFIG} with format "
            f"diffmic-model and {WEIGHTS}, written by `diffmic export`); found {sorted(p.name for p in folder.iterdir())}"
        )
    return folder


def resolve_model(
    ref: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """A local model folder as it is, or the cached snapshot of a Hub model id (``org/name``)."""
    p = Path(ref)
    if p.exists():
        if revision:
            raise ExportError(f"'{ref}' is a local folder: a revision ({revision!r}) applies to Hub models only")
        return p
    if is_repo_id(str(ref)):
        return download_model(str(ref), revision, cache_dir, local_files_only, token)
    raise ExportError(
        f"'{ref}' is neither a local model folder nor a Hugging Face Hub model id (org/name); export a model "
        "with `diffmic export --run RUN --out DIR`"
    )


def hub_card(folder: str | os.PathLike, repo_id: str) -> str:
    """The ``README.md`` of the Hub repository: a metadata header (library, tags, pipeline) and the
    folder's ``MODEL_CARD.md``, with how to load it."""
    import json

    folder = Path(folder)
    meta = json.loads((folder / CONFIG).read_text())
    card = (folder / CARD).read_text() if (folder / CARD).is_file() else ""
    dataset = str(meta.get("config", {}).get("data", {}).get("dataset", ""))
    header = [
        "---",
        "library_name: diffmic",
        "pipeline_tag: image-classification",
        "tags:",
        "- diffmic",
        "- medical-imaging",
        "- image-classification",
        "- diffusion",
        *([f"- {dataset}"] if re.fullmatch(r"[A-Za-z0-9_.-]+", dataset) else []),
        "---",
        "",
    ]
    usage = [
        "",
        "## Use",
        "",
        "```python",
        "from diffmic.inference import Predictor",
        f'p = Predictor.from_pretrained("{repo_id}")  # revision="<commit>" pins a version',
        'r = p.predict(["image.png"])[0]',
        "```",
        "",
        f"or `diffmic predict --model {repo_id} image.png`. The weights' SHA-256 in `{CONFIG}` is checked on load.",
        "",
    ]
    return "\n".join(header) + card.rstrip("\n") + "\n" + "\n".join(usage)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    api: Any = None,
) -> str:
    """Upload the model folder ``folder`` (checked first, as a load would) to the Hub model
    repository ``repo_id`` (created if needed) in one commit, with :func:`hub_card` as its
    ``README.md``. Returns the commit URL. ``api``: an ``HfApi`` (default: a new one, logged in by
    ``hf auth login`` or ``HF_TOKEN``)."""
    if not is_repo_id(repo_id):
        raise ExportError(f"--push-to-hub: {repo_id!r} is not a Hub model id (org/name)")
    folder = Path(folder)
    load_model_folder(folder)  # every check of a load (schema, SHA-256, sizes) before anything is uploaded
    hub = _hub()
    api = api if api is not None else hub.HfApi(token=token)
    files = [CONFIG, WEIGHTS, *(n for n in (CARD,) if (folder / n).is_file())]
    files += sorted(p.name for p in folder.glob("*.onnx"))
    with tempfile.TemporaryDirectory(prefix="diffmic-hub-") as tmp:
        staging = Path(tmp)
        for name in files:  # a link where the file system allows it (no copy of the weights)
            try:
                os.link(folder / name, staging / name)
            except OSError:
                shutil.copy2(folder / name, staging / name)
        (staging / "README.md").write_text(hub_card(folder, repo_id))
        try:
            api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
            info = api.upload_folder(
                folder_path=str(staging),
                repo_id=repo_id,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or f"diffmic {__version__}: upload model folder {folder.name}",
            )
        except ExportError:
            raise
        except Exception as exc:  # HfHubHTTPError, no network, no login: say which and where
            raise ExportError(
                f"--push-to-hub: uploading '{folder}' to '{repo_id}' failed ({type(exc).__name__}: {exc}). "
                "Log in with `hf auth login` (or set HF_TOKEN) and check the network; the local folder is complete"
            ) from exc
    return str(getattr(info, "commit_url", None) or info)
