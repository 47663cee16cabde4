"""Artifact signatures: `NAME.sig` beside the manifest, made and checked by OpenSSF's model-signing
library with an elliptic-curve key pair (works offline). The signature covers the manifest and every
file it lists, and nothing else in the folder (other artifacts may share it).

A signed manifest is enough to trust the rest, since it holds every file's hash; signing the files
too lets a mismatch name the file that changed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import UserError
from .files import read_json


def signature_path(manifest: Path) -> Path:
    return manifest.with_name(f"{manifest.stem}.sig")


def _library() -> ModuleType:
    try:
        import model_signing
    except ImportError:
        raise UserError("signatures need the model-signing library: pip install 'megatron-deploy[sign]'") from None
    return model_signing


def _artifact_files(manifest: Path) -> set[str]:
    """The manifest and the files it lists (its signature excluded: it cannot sign itself)."""
    files: Any = read_json(manifest, "manifest").get("files")
    return {manifest.name, *(files if isinstance(files, dict) else {})}


def sign(manifest: Path, private_key: Path, password: str | None = None) -> Path:
    """Write NAME.sig for the artifact whose manifest is `manifest` (replacing an older one)."""
    model_signing = _library()
    try:
        config = model_signing.signing.Config().use_elliptic_key_signer(
            private_key=private_key, password=None if password is None else password.encode())
    except FileNotFoundError:
        raise UserError(f"--key {private_key}: no such file") from None
    except (ValueError, TypeError) as err:  # not a PEM private key, or a wrong or missing password
        raise UserError(f"--key {private_key}: not a usable elliptic-curve private key ({err})") from None
    target = signature_path(manifest)
    handle, scratch = tempfile.mkstemp(prefix=f".{target.name}.", dir=manifest.parent)
    os.close(handle)
    try:
        config.set_hashing_config(_only_this_artifact(model_signing, manifest))
        config.sign(manifest.parent, scratch)
        os.chmod(scratch, 0o644)  # a signature is public
        os.replace(scratch, target)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return target


def _only_this_artifact(model_signing: ModuleType, manifest: Path) -> Any:
    """Hashing that sees exactly this artifact's files: a signature of another artifact (or of fewer
    files) then fails to match."""
    mine = _artifact_files(manifest)
    others = [p.name for p in manifest.parent.iterdir() if p.name not in mine]
    return model_signing.hashing.Config().set_ignored_paths(paths=others)


def check(folder_manifest: Path, public_key: Path, shown: Path) -> None:
    """Raise UserError unless NAME.sig beside `folder_manifest` is a signature by `public_key` of the
    artifact as it is now. Its folder (runtime.pinned's) holds exactly the artifact's files and the
    signature; `shown` is the manifest's path that errors name."""
    model_signing = _library()
    signature = signature_path(folder_manifest)
    if not Path(public_key).is_file():
        raise UserError(f"public key {public_key}: no such file")
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=[signature.name]).set_allow_symlinks(True)
    config = model_signing.verifying.Config().set_hashing_config(hashing)
    try:
        config.use_elliptic_key_verifier(public_key=public_key).verify(folder_manifest.parent, signature)
    except Exception as err:  # the library raises ValueError, cryptography's errors and others alike
        raise UserError(f"{shown}: signature check failed: {str(err) or type(err).__name__}") from None
