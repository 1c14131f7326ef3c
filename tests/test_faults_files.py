"""Every file the package writes (routing records, routing memories, Counterfactual Routing plans)
under faults: truncation, a flipped bit in each part (length prefix, manifest, data), foreign and
empty files, another format version, a manifest that no longer describes its data (re-checksummed,
as a buggy writer would), a missing file, and a write that fails halfway (the old file intact, no
temporary file left)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

import moe_kernels as mk
from moe_kernels import cor, files, replay
from moe_kernels.knn import RoutingMemory


def _record():
    torch.manual_seed(0)
    model = nn.Sequential(mk.MoE(16, 8, 8, 2))
    with replay.record(model) as record:
        model(torch.randn(2, 5, 16))
    return record


KINDS = {
    # kind: (build, save(obj, path), load(path), a manifest change that contradicts the data, its message)
    "record": (
        _record,
        lambda obj, path: obj.save(path),
        replay.RoutingRecord.load,
        lambda manifest: manifest["layers"][0].update(num_experts=2),
        r"holds ids outside \[-1, 2\)",
    ),
    "memory": (
        lambda: RoutingMemory(torch.randn(30, 8), torch.randn(30, 4), index="torch", layer=1),
        lambda obj, path: obj.save(path),
        RoutingMemory.load,
        lambda manifest: manifest.update(num_entries=31),
        "the manifest's num_entries is 31, its data 30",
    ),
    "plan": (
        lambda: cor.CoRPlan(torch.tensor([2, 1]), torch.rand(2, 4)),
        lambda obj, path: obj.save(path),
        cor.CoRPlan.load,
        lambda manifest: manifest.update(num_experts=5),
        "the plan says L=2, E=5 but holds L=2, E=4",
    ),
}


def _saved(kind: str, tmp_path):
    build, save, load, _, _ = KINDS[kind]
    path = tmp_path / f"{kind}.bin"
    save(build(), path)
    return path, load


def _edit_manifest(path, change) -> None:
    """Apply ``change`` to the file's manifest and re-stamp its checksum (a writer's bug, not
    corruption: only the field checks can catch it)."""
    data = path.read_bytes()
    if path.read_bytes()[:1] == b"{":  # a JSON document
        document = json.loads(data)
        change(document)
        document["checksum"] = files.checksum(document, {})
        path.write_text(json.dumps(document))
        return
    from safetensors import safe_open

    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    manifest = json.loads(header["__metadata__"][files.MANIFEST_KEY])
    change(manifest)
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    manifest["checksum"] = files.checksum(manifest, tensors)
    header["__metadata__"][files.MANIFEST_KEY] = json.dumps(manifest)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])


def _flip(path, where: str) -> None:
    data = bytearray(path.read_bytes())
    if where == "data":
        position = len(data) - 5
    elif where == "length":
        position = 0
    else:  # a digit of the manifest's own JSON: still parses, no longer matches its checksum
        text = data.decode("latin-1")
        position = text.index('\\"num_experts\\": ' if '\\"' in text else '"num_experts": ')
        position = next(i for i in range(position, len(text)) if text[i].isdigit())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_round_trips(kind, tmp_path):
    build, save, load, _, _ = KINDS[kind]
    original = build()
    path = tmp_path / "file"
    save(original, path)
    loaded = load(path)
    if kind == "record":
        assert all(torch.equal(loaded.ids(n), original.ids(n)) for n in original.layers)
    elif kind == "memory":
        assert torch.equal(loaded.values, original.values) and loaded.layer == 1
    else:
        assert torch.equal(loaded.prior, original.prior) and torch.equal(loaded.k, original.k)


@pytest.mark.parametrize("fault", ["truncated", "length", "manifest", "data", "empty", "foreign", "version", "field"])
@pytest.mark.parametrize("kind", KINDS)
def test_faulty_files_are_refused_naming_the_file(kind, fault, tmp_path):
    path, load = _saved(kind, tmp_path)
    _, _, _, contradiction, message = KINDS[kind]
    if fault == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])
    elif fault in ("length", "manifest", "data"):
        if fault == "length" and kind == "plan":
            pytest.skip("a JSON document has no length prefix")
        _flip(path, fault)
    elif fault == "empty":
        path.write_bytes(b"")
    elif fault == "foreign":
        other = {"record": "plan", "memory": "record", "plan": "memory"}[kind]
        KINDS[other][1](KINDS[other][0](), path)
    elif fault == "version":
        _edit_manifest(path, lambda manifest: manifest.update(format_version=99))
    else:
        _edit_manifest(path, contradiction)
    expected = message if fault == "field" else "has format version 99" if fault == "version" else None
    with pytest.raises(ValueError, match=expected) as caught:
        load(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_missing_file_raises_file_not_found(kind, tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        KINDS[kind][2](tmp_path / "absent")


@pytest.mark.parametrize("step", ["write", "rename"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_write_keeps_the_old_file(kind, step, tmp_path, monkeypatch):
    path, load = _saved(kind, tmp_path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    if step == "rename":
        monkeypatch.setattr(files.os, "replace", fail)
    else:  # the write itself: json's text write or safetensors' save_file
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", fail)
        monkeypatch.setattr(files.Path, "write_text", fail)
    build, save, _, _, _ = KINDS[kind]
    with pytest.raises(OSError, match="disk full"):
        save(build(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    load(path)


def test_no_pickle_and_no_unsafe_torch_load():
    """The package never unpickles (multiprocessing's queues in ``distributed.run_group`` pickle
    between live processes, never to or from a file): no ``pickle.load(s)``, no unpickler, no
    ``torch.load`` without ``weights_only=True``."""
    import pathlib
    import re

    root = pathlib.Path(mk.__file__).parent
    for source in root.rglob("*.py"):
        text = source.read_text()
        assert not re.search(r"pickle\.loads?\(|Unpickler|cPickle", text), source
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (source, call)
