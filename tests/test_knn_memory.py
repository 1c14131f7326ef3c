"""The kNN-MoE routing memory: exact search, faiss indexes, save/load safety, bad input."""

from __future__ import annotations

import os

import pytest
import torch

from moe_kernels import files as files_module
from moe_kernels import softmax_topk
from moe_kernels.config import RoutingConfig
from moe_kernels.knn import KNNRouter, RoutingMemory, faiss_available
from moe_kernels.knn import memory as memory_module

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed on this machine")


def _cases(num_entries=3000, dim=32, num_experts=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_entries, dim, generator=generator)
    values = torch.randn(num_entries, num_experts, generator=generator)
    queries = torch.randn(57, dim, generator=generator)
    return keys, values, queries


def _brute_force(keys, queries, n):
    sims = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    top = sims.topk(n, dim=1)
    return top.indices, top.values


@pytest.mark.parametrize("chunk", [64, 1000, memory_module.SEARCH_CHUNK])
def test_exact_torch_search_equals_brute_force(monkeypatch, chunk):
    monkeypatch.setattr(memory_module, "SEARCH_CHUNK", chunk)  # merges across chunk boundaries
    keys, values, queries = _cases()
    ids, sims = RoutingMemory(keys, values, index="torch").search(queries, 8)
    want_ids, want_sims = _brute_force(keys, queries, 8)
    assert ids.dtype == torch.int64 and sims.dtype == torch.float32 and ids.shape == (57, 8)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    torch.testing.assert_close(sims, want_sims)


@needs_faiss
def test_faiss_flat_equals_exact():
    keys, values, queries = _cases()
    ids, sims = RoutingMemory(keys, values, index="flat").search(queries, 8)
    want_ids, want_sims = RoutingMemory(keys, values, index="torch").search(queries, 8)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    torch.testing.assert_close(sims, want_sims, atol=1e-5, rtol=1e-5)


def _recall(ids, want_ids):
    """Mean fraction of the exact neighbours found."""
    return sum(len(set(a) & set(b)) for a, b in zip(ids.tolist(), want_ids.tolist())) / want_ids.numel()


@needs_faiss
def test_ivf_probing_every_list_is_exact_and_approximate_indexes_recall():
    keys, values, queries = _cases()
    want_ids, _ = RoutingMemory(keys, values, index="torch").search(queries, 8)
    ids, _ = RoutingMemory(keys, values, index="ivf", index_options=dict(nlist=16, nprobe=16)).search(queries, 8)
    torch.testing.assert_close(ids, want_ids, atol=0, rtol=0)
    for index, options in (("hnsw", dict(ef_search=256)), ("ivfpq", dict(nlist=8, nprobe=8, m=8))):
        ids, _ = RoutingMemory(keys, values, index=index, index_options=options).search(queries, 8)
        assert ((ids >= 0) & (ids < len(keys))).all()
        recall = _recall(ids, want_ids)
        assert recall > (0.9 if index == "hnsw" else 0.3), f"{index} recall@8 {recall:.2f}"


@needs_faiss
def test_ivfpq_refine_re_ranks_by_exact_similarity():
    """The refine stage re-scores ``refine * n`` PQ candidates exactly: recall rises well above
    plain PQ's, and the returned similarities are the exact cosines of the returned ids."""
    keys, values, queries = _cases()
    want_ids, _ = RoutingMemory(keys, values, index="torch").search(queries, 8)
    options = dict(nlist=8, nprobe=8, m=8)
    plain, _ = RoutingMemory(keys, values, index="ivfpq", index_options=options).search(queries, 8)
    ids, sims = RoutingMemory(keys, values, index="ivfpq", index_options=dict(options, refine=8)).search(queries, 8)
    assert _recall(ids, want_ids) > max(0.9, _recall(plain, want_ids) + 0.2), (
        _recall(ids, want_ids),
        _recall(plain, want_ids),
    )
    exact = (
        torch.nn.functional.normalize(queries, dim=-1)[:, None, :] @ torch.nn.functional.normalize(keys, dim=-1)[ids].mT
    )
    torch.testing.assert_close(sims, exact[:, 0, :], atol=1e-5, rtol=1e-5)
    assert (sims[:, :-1] >= sims[:, 1:]).all()
    with pytest.raises(ValueError, match=r"index_options\['refine'\] must be an int >= 0, got -1"):
        RoutingMemory(keys, values, index="ivfpq", index_options=dict(options, refine=-1))


@pytest.mark.parametrize(
    "index,options",
    [
        ("torch", {}),
        pytest.param("ivf", dict(nlist=16, nprobe=4), marks=needs_faiss),
        pytest.param("ivfpq", dict(nlist=16, nprobe=4, m=8, refine=4), marks=needs_faiss),
    ],
)
def test_save_load_round_trip(tmp_path, index, options):
    keys, values, queries = _cases()
    memory = RoutingMemory(keys, values, index=index, index_options=options, model="tiny-moe", layer=3)
    path = tmp_path / "memory.safetensors"
    memory.save(path)
    loaded = RoutingMemory.load(path, model="tiny-moe", layer=3, key_dim=32, num_experts=16)
    assert torch.equal(loaded.keys, memory.keys) and torch.equal(loaded.values, memory.values)
    assert (loaded.metric, loaded.index_kind, loaded.model, loaded.layer) == ("cosine", index, "tiny-moe", 3)
    for got, want in zip(loaded.search(queries, 5), memory.search(queries, 5)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert os.listdir(tmp_path) == ["memory.safetensors"]  # no temporary file left behind


def test_corrupt_truncated_missing_and_mismatched_files_are_refused(tmp_path):
    keys, values, _ = _cases(200)
    path = tmp_path / "memory.safetensors"
    RoutingMemory(keys, values, index="torch", model="tiny-moe", layer=1).save(path)
    data = bytearray(path.read_bytes())

    corrupt = tmp_path / "corrupt.safetensors"
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF  # a byte of the values
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is corrupted"):
        RoutingMemory.load(corrupt)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        RoutingMemory.load(truncated)

    with pytest.raises(FileNotFoundError, match="no file at"):
        RoutingMemory.load(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="was built for layer=1, expected 2"):
        RoutingMemory.load(path, layer=2)
    with pytest.raises(ValueError, match="was built for num_experts=16, expected 64"):
        RoutingMemory.load(path, num_experts=64)


def test_interrupted_save_keeps_the_old_memory(tmp_path, monkeypatch):
    keys, values, _ = _cases(200)
    path = tmp_path / "memory.safetensors"
    RoutingMemory(keys, values, index="torch", layer=1).save(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash before the rename")

    monkeypatch.setattr(files_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        RoutingMemory(keys * 2, values, index="torch", layer=2).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["memory.safetensors"]
    assert RoutingMemory.load(path).layer == 1


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda k, v: RoutingMemory(k[:5], v), ValueError, r"same N, got 5 and 300"),
        (lambda k, v: RoutingMemory(k.int(), v), TypeError, r"keys must be a float tensor"),
        (lambda k, v: RoutingMemory(k[0], v), ValueError, r"keys must be 2-D"),
        (lambda k, v: RoutingMemory(k, v, metric="l1"), ValueError, r"metric must be one of"),
        (lambda k, v: RoutingMemory(k, v, index="lsh"), ValueError, r"index must be one of"),
        (lambda k, v: RoutingMemory(k, v, index="torch").search(torch.randn(3, 7), 2), ValueError, r"shape \(T, 32\)"),
        (
            lambda k, v: RoutingMemory(k, v, index="torch").search(torch.randn(3, 32), 301),
            ValueError,
            r"n must be an int in \[1, 300\]",
        ),
    ],
)
def test_bad_input(call, error, match):
    keys, values, _ = _cases(300)
    with pytest.raises(error, match=match):
        call(keys, values)


def _router_and_memory(num_experts=16, hidden=32, entries=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_experts, hidden, generator=generator)
    keys = torch.randn(entries, hidden, generator=generator)
    # The stored logits strongly prefer experts the frozen router would not pick: 0 and 1.
    values = torch.full((entries, num_experts), -5.0)
    values[:, :2] = 5.0
    return weight, RoutingMemory(keys, values, index="torch")


def test_knn_router_follows_a_confident_memory():
    weight, memory = _router_and_memory()
    router = KNNRouter(weight, memory, 2, n_neighbors=1, routing=RoutingConfig.renormalize(), backend="torch")
    weights, ids = router(memory.keys[:7].reshape(7, 1, 32) * 3.0)  # cosine similarity 1
    assert weights.shape == ids.shape == (7, 1, 2)
    assert (ids.sort(-1).values == torch.tensor([0, 1], dtype=torch.int32)).all()


def test_knn_router_falls_back_to_the_frozen_router():
    weight, memory = _router_and_memory()
    queries = torch.randn(9, 32)
    router = KNNRouter(weight, memory, 3, n_neighbors=4, min_confidence=0.99, backend="torch")
    weights, ids = router(queries)  # random queries: mean similarity far below 0.99
    want_weights, want_ids = softmax_topk(queries @ weight.T, 3, backend="torch")
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)


def test_knn_router_treats_missing_neighbours_as_dissimilar(monkeypatch):
    weight, memory = _router_and_memory()
    queries = memory.keys[:5] * 3.0
    found_ids, found_sims = memory.search(queries, 2)
    # An approximate index that found only the first neighbour of each query (faiss pads with -1).
    monkeypatch.setattr(
        memory,
        "search",
        lambda q, n: (
            torch.where(torch.arange(n) == 0, found_ids, -1),
            torch.where(torch.arange(n) == 0, found_sims, -1.0),
        ),
    )
    router = KNNRouter(weight, memory, 2, n_neighbors=2, backend="torch")
    weights, ids = router(queries)
    logits = queries @ weight.T
    # Confidence halves (similarity 1 and 0) and the missing slot carries no weight.
    mixed = 0.5 * memory.values[found_ids[:, 0]] + 0.5 * logits
    want_weights, want_ids = softmax_topk(mixed, 2, backend="torch")
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights)


def test_knn_router_rejects_a_mismatched_memory():
    weight, memory = _router_and_memory()
    with pytest.raises(ValueError, match=r"router weight \(E, H\) = \(8, 32\) needs 32 and 8"):
        KNNRouter(weight[:8], memory, 2)


@needs_faiss
def test_gpu_faiss_dispatch(monkeypatch):
    """The GPU branch of ``search`` with faiss's GPU calls stood in for (no faiss GPU build or GPU
    here): a supported index is cloned once per device and searched with torch tensors, giving
    the host index's results; one faiss cannot clone warns once and searches on the host."""
    import faiss

    clones = []

    def index_cpu_to_gpu(resources, device, index):
        clones.append((type(index).__name__, device))
        if isinstance(index, faiss.IndexHNSWFlat):
            raise RuntimeError("not implemented for GPU")
        return index  # the "GPU copy" searches like the original

    monkeypatch.setattr(memory_module, "_use_faiss_gpu", lambda device: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", index_cpu_to_gpu, raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    keys, values, queries = _cases()
    for kind, options in (("flat", {}), ("ivf", dict(nlist=16, nprobe=4))):
        memory = RoutingMemory(keys, values, index=kind, index_options=options)
        want_sims, want_ids = memory._faiss_index.search(torch.nn.functional.normalize(queries, dim=-1).numpy(), 8)
        for _ in range(2):
            ids, sims = memory.search(queries, 8)
            assert isinstance(ids, torch.Tensor) and ids.dtype == torch.int64
            assert torch.equal(ids, torch.from_numpy(want_ids)) and torch.equal(sims, torch.from_numpy(want_sims))
    assert [name for name, _ in clones] == ["IndexFlatIP", "IndexIVFFlat"]  # once per memory and device
    memory = RoutingMemory(keys, values, index="hnsw")
    with pytest.warns(UserWarning, match="cannot put index='hnsw' on the GPU"):
        ids, _ = memory.search(queries, 8)
    ids_again, _ = memory.search(queries, 8)  # no second warning, no second clone attempt
    assert torch.equal(ids, ids_again) and [name for name, _ in clones][-1] == "IndexHNSWFlat" and len(clones) == 3
