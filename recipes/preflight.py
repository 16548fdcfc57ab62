"""What a run checks before it builds any model: a wrong data path, image folder or hub id is reported in a second,
not after a 7B model was downloaded and loaded, and never as a minute of hub retries in every rank.

Each check raises ConfigError naming the config key and what is wrong (the recipes report it as one `error:` line,
exit status 2).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from .config import ConfigError

HUB_TIMEOUT_S = 10.0


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_model(key: str, name: Optional[str]) -> None:
    """A local folder or file, or a hub id that is in the local Hugging Face cache or (online) on the hub. One
    question to the hub at most, with a timeout: never the loader's retries."""
    if not name or Path(name).exists():
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"{key}: {name} not found (neither a file nor a folder)")
    from huggingface_hub import try_to_load_from_cache
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repository id
        raise ConfigError(f"{key}: {name!r} is neither a local path nor a hub id") from None
    if isinstance(cached, str):
        return
    if _offline():
        raise ConfigError(f"{key}: {name} is not a local path and not in the local Hugging Face cache (offline: "
                          f"HF_HUB_OFFLINE is set); download it first, or give the folder holding it")
    from huggingface_hub import model_info
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError
    try:
        model_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ConfigError(f"{key}: {name} is a gated repository: accept its terms on the hub and log in "
                          f"(`huggingface-cli login`), or give a local copy") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}: {name} is not on the hub (a typo? a private repository needs "
                          f"`huggingface-cli login`) and not a local path") from None
    except Exception as e:  # no network, a proxy, a timeout
        raise ConfigError(f"{key}: {name} is not in the local Hugging Face cache and the hub cannot be reached "
                          f"({type(e).__name__}); download it first, or give the folder holding it") from None


def check_file(key: str, path: Optional[str]) -> None:
    if path and not Path(path).is_file():
        raise ConfigError(f"{key}: {path} not found" + (" (a folder, not a file)" if Path(path).is_dir() else ""))


def check_data(key: str, path: Optional[str]) -> None:
    """A data file, or a folder written by datasets' save_to_disk."""
    if path and not Path(path).is_file():
        if Path(path).is_dir():
            if not any((Path(path) / name).is_file() for name in ("state.json", "dataset_dict.json")):
                raise ConfigError(f"{key}: {path} is a folder, but not one written by datasets' save_to_disk")
        else:
            raise ConfigError(f"{key}: {path} not found")


def check_folder(key: str, path: Optional[str]) -> None:
    if path and not Path(path).is_dir():
        raise ConfigError(f"{key}: folder {path} not found" + (" (a file)" if Path(path).is_file() else ""))


def check_output(key: str, path: str) -> None:
    """The output folder exists or can be made, and takes files."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in {path} ({e.strerror or e})") from None


def remote_code_refused(error: BaseException) -> bool:
    """transformers' refusal to load a checkpoint that needs the code in its own repository (Phi-3.5-vision,
    InternVL2) without trust_remote_code=True."""
    return isinstance(error, ValueError) and "trust_remote_code" in str(error)
