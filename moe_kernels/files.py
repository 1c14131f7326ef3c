"""The one way this package writes and reads its files: one safetensors file holding the tensors
and a JSON manifest (:func:`write_tensors`), or one JSON document (:func:`write_json`), written
atomically (a temporary file in the same folder, flushed to disk,
then ``os.replace``: a failed write leaves the old file intact), with a format name, a format
version and a SHA-256 checksum over the manifest *and* the tensors. Reading refuses, with a
``ValueError`` naming the file and what is wrong, anything that is not such a file of the
expected format and version, or whose checksum does not match. No pickle is involved."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

# The safetensors metadata key holding the manifest.
MANIFEST_KEY = "moe_kernels_manifest"


def checksum(manifest: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the manifest (its canonical JSON, without a ``checksum`` field) and every
    tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    fields = {key: value for key, value in manifest.items() if key != "checksum"}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_tensors(path, tensors: dict[str, torch.Tensor], manifest: dict, *, kind: str, version: int) -> Path:
    """Write ``tensors`` (CPU copies are written) and ``manifest`` (JSON-serialisable) to ``path``
    atomically, the manifest completed with ``format`` = ``kind``, ``format_version`` and
    ``checksum``. Returns the path."""
    from safetensors.torch import save_file

    data = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    manifest = _stamped(manifest, data, kind, version)
    return _atomic(path, lambda tmp: save_file(data, tmp, metadata={MANIFEST_KEY: json.dumps(manifest)}))


def write_json(path, document: dict, *, kind: str, version: int) -> Path:
    """Write ``document`` (JSON-serialisable) to ``path`` as indented JSON, atomically, completed
    with ``format``, ``format_version`` and ``checksum`` as :func:`write_tensors`. Returns the path."""
    document = _stamped(document, {}, kind, version)
    text = json.dumps(document, indent=1) + "\n"
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path, *, kind: str, version: int, op: str) -> dict:
    """The document of a file :func:`write_json` wrote with ``kind`` and ``version`` (its
    ``format``, ``format_version`` and ``checksum`` fields removed); the errors of
    :func:`read_tensors`."""
    path = _existing(path, op)
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{op}: {path} is not a readable JSON file ({error})") from error
    _verify(document, {}, path, kind, version, op)
    return {key: value for key, value in document.items() if key not in ("format", "format_version", "checksum")}


def _stamped(manifest: dict, tensors: dict, kind: str, version: int) -> dict:
    manifest = {**manifest, "format": kind, "format_version": version}
    manifest["checksum"] = checksum(manifest, tensors)
    return manifest


def _atomic(path, write) -> Path:
    """``write(tmp)`` a temporary file next to ``path``, flush it to disk and rename it over
    ``path``; on any failure the temporary file goes and ``path`` is left as it was."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _existing(path, op: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{op}: no file at {path}")
    return path


def read_tensors(path, *, kind: str, version: int, op: str) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, manifest)`` of a file :func:`write_tensors` wrote with ``kind`` and
    ``version``; ``FileNotFoundError`` for no file, ``ValueError`` (naming ``op`` and the file)
    for an unreadable, foreign, other-version or corrupted one."""
    from safetensors import safe_open

    path = _existing(path, op)
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(MANIFEST_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # safetensors reports truncation and bad headers in its own types
        raise ValueError(f"{op}: {path} is not a readable safetensors file ({error})") from error
    try:
        manifest = json.loads(text) if text is not None else None
    except json.JSONDecodeError as error:
        raise ValueError(f"{op}: {path} has a malformed manifest ({error})") from error
    _verify(manifest, tensors, path, kind, version, op)
    return tensors, manifest


def _verify(manifest, tensors: dict, path: Path, kind: str, version: int, op: str) -> None:
    """The format, the version and the checksum of a file's manifest, or the named error."""
    if not isinstance(manifest, dict) or manifest.get("format") != kind:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{op}: {path} is not a {kind} file (format {found!r})")
    if manifest.get("format_version") != version:
        raise ValueError(
            f"{op}: {path} has format version {manifest.get('format_version')!r}, this moe_kernels reads {version}"
        )
    if manifest.get("checksum") != checksum(manifest, tensors):
        raise ValueError(f"{op}: {path} is corrupted (the checksum over its manifest and data does not match)")
