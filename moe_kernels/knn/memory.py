"""The kNN-MoE routing memory: keys (router inputs of reference tokens) and values (their
optimised routing logits), searched by similarity.

Search goes through faiss when it is installed (an exact flat index, or IVF / IVF-PQ / HNSW for
large memories; with a GPU build of faiss, CUDA queries search a copy of the index on their GPU
without leaving it) and through an exact chunked-matmul search in PyTorch otherwise. A memory is saved
as one safetensors file holding the keys, the values, the serialised faiss index and a manifest,
written to a temporary file and renamed into place, so a crash mid-save never damages an existing
memory, and a file whose checksum or manifest does not match is refused on load.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch

from moe_kernels.files import read_tensors, write_tensors

FORMAT = "moe_kernels.RoutingMemory"
# 2: the checksum covers the manifest too (moe_kernels.files); version 1 files are refused.
FORMAT_VERSION = 2
METRICS = ("cosine", "inner_product")
INDEXES = ("flat", "ivf", "ivfpq", "hnsw", "torch")
# Keys an IVF-PQ index needs to train its 8-bit product-quantiser codes (2**8 centroids each).
PQ_MIN_ENTRIES = 256
# Keys scored per step of the exact PyTorch search: bounds its (T, chunk) similarity buffer.
SEARCH_CHUNK = 65536


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _use_faiss_gpu(device: torch.device) -> bool:
    """Whether queries on ``device`` are searched by a faiss GPU index: CUDA queries, with a
    faiss build that has GPU support and sees a GPU."""
    if device.type != "cuda":
        return False
    import faiss

    return hasattr(faiss, "index_cpu_to_gpu") and faiss.get_num_gpus() > 0


class RoutingMemory:
    """A routing memory of ``N`` cases.

    Args:
        keys: ``(N, d)`` float router inputs (hidden states) of the reference tokens.
        values: ``(N, E)`` float routing logits optimised for those tokens.
        metric: ``"cosine"`` (keys and queries L2-normalised, the default) or ``"inner_product"``.
        index: ``"flat"`` (exact, faiss), ``"ivf"``, ``"ivfpq"`` (the kNN-MoE paper's setting:
            ``d / 8`` one-byte codes per key), ``"hnsw"``, or ``"torch"`` (exact, no faiss).
            Without faiss every index falls back to ``"torch"`` with a warning.
        index_options: ``nlist`` and ``nprobe`` (IVF, IVF-PQ), ``m`` (IVF-PQ sub-quantisers),
            ``refine`` (IVF-PQ: re-rank ``refine * n`` code-distance candidates by their exact
            similarity; 0, the default and the paper's setting, re-ranks nothing), ``hnsw_m`` and
            ``ef_search`` (HNSW). A refined IVF-PQ index keeps a float32 copy of the keys inside
            faiss (``4 d`` bytes per case on top of the ``m`` code bytes); it is what makes the
            compressed search recall the true neighbours of clustered hidden states.
        model, layer: what the memory was built for; kept in the manifest and checked on load.

    Keys and values are kept as float32 CPU tensors (``.keys``, ``.values``).
    """

    def __init__(self, keys, values, *, metric="cosine", index="flat", index_options=None, model=None, layer=None):
        _check_tensor("keys", keys, 2)
        _check_tensor("values", values, 2)
        if keys.shape[0] != values.shape[0]:
            raise ValueError(
                f"RoutingMemory: keys and values must have the same N, got {keys.shape[0]} and {values.shape[0]}"
            )
        if keys.shape[0] < 1:
            raise ValueError("RoutingMemory: the memory needs at least one case, got N=0")
        if metric not in METRICS:
            raise ValueError(f"RoutingMemory: metric must be one of {METRICS}, got {metric!r}")
        if index not in INDEXES:
            raise ValueError(f"RoutingMemory: index must be one of {INDEXES}, got {index!r}")
        keys = keys.detach().to("cpu", torch.float32)
        self.keys = _normalize(keys) if metric == "cosine" else keys.contiguous()
        self.values = values.detach().to("cpu", torch.float32).contiguous()
        self.metric = metric
        self.index_kind = index
        self.index_options = dict(index_options or {})
        self.model, self.layer = model, layer
        self._faiss_index = None
        self._gpu_indexes = {}  # CUDA device index -> (faiss GPU resources, cloned index), or None
        if index != "torch":
            if faiss_available():
                self._faiss_index = _build_faiss_index(self.keys, index, self.index_options)
            else:
                warnings.warn(
                    f"RoutingMemory: faiss is not installed; index={index!r} falls back to exact torch search",
                    stacklevel=2,
                )

    @property
    def num_entries(self) -> int:
        return self.keys.shape[0]

    @property
    def key_dim(self) -> int:
        return self.keys.shape[1]

    @property
    def num_experts(self) -> int:
        return self.values.shape[1]

    def search(self, queries: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``n`` most similar cases of each query.

        ``queries (T, d)`` float on any device -> ``ids (T, n)`` int64 and ``sims (T, n)`` float32
        on the queries' device, most similar first. ``n`` may not exceed the memory size.

        CUDA queries: with a GPU build of faiss, a copy of the index on the queries' GPU (made on
        the first such search) is searched there, without a host round trip; otherwise, and for
        indexes faiss's GPU module lacks (HNSW, refined IVF-PQ), on the host.
        """
        _check_tensor("queries", queries, 2)
        if queries.shape[1] != self.key_dim:
            raise ValueError(
                f"RoutingMemory.search: queries must have shape (T, {self.key_dim}), got {tuple(queries.shape)}"
            )
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.num_entries:
            raise ValueError(f"RoutingMemory.search: n must be an int in [1, {self.num_entries}], got {n!r}")
        device = queries.device
        q = queries.detach().to(torch.float32)
        if self.metric == "cosine":
            q = _normalize(q)
        if self._faiss_index is None:
            sims, ids = _exact_search(self.keys.to(device), q, n)
            return ids, sims
        gpu_index = self._gpu_index(device) if _use_faiss_gpu(device) else None
        if gpu_index is not None:
            import faiss.contrib.torch_utils  # noqa: F401  (index.search then takes torch tensors, on the GPU too)

            sims, ids = gpu_index.search(q.contiguous(), n)
            return ids, sims
        # faiss CPU indexes search host memory: CUDA queries are copied over (a host sync, which is
        # why a faiss-backed gate cannot be captured in a CUDA graph; the torch search stays on
        # the queries' device).
        sims, ids = self._faiss_index.search(q.cpu().contiguous().numpy(), n)
        return torch.from_numpy(ids).to(device), torch.from_numpy(sims).to(device)

    def _gpu_index(self, device: torch.device):
        """The faiss index cloned to ``device``'s GPU, made once per device; None (with a warning,
        once) where faiss's GPU module does not take this index (HNSW, a refined IVF-PQ, or more
        IVF-PQ code bytes than it supports): such a memory searches on the host."""
        import faiss

        slot = device.index if device.index is not None else torch.cuda.current_device()
        if slot not in self._gpu_indexes:
            try:
                resources = faiss.StandardGpuResources()
                clone = faiss.index_cpu_to_gpu(resources, slot, self._faiss_index)
                self._gpu_indexes[slot] = (resources, clone)  # the clone needs its resources alive
            except RuntimeError as error:  # faiss raises RuntimeError for what its GPU module lacks
                warnings.warn(
                    f"RoutingMemory: faiss cannot put index={self.index_kind!r} on the GPU ({error}); "
                    "searching on the host",
                    stacklevel=3,
                )
                self._gpu_indexes[slot] = None
        entry = self._gpu_indexes[slot]
        return None if entry is None else entry[1]

    def save(self, path) -> None:
        """Write the memory to ``path`` (one safetensors file), atomically, with a checksum over
        its manifest and tensors (:mod:`moe_kernels.files`)."""
        tensors = {"keys": self.keys, "values": self.values}
        if self._faiss_index is not None:
            import faiss

            tensors["faiss_index"] = torch.from_numpy(faiss.serialize_index(self._faiss_index))
        manifest = dict(
            num_entries=self.num_entries,
            key_dim=self.key_dim,
            num_experts=self.num_experts,
            metric=self.metric,
            index=self.index_kind,
            index_options=self.index_options,
            model=self.model,
            layer=self.layer,
        )
        write_tensors(path, tensors, manifest, kind=FORMAT, version=FORMAT_VERSION)

    @classmethod
    def load(cls, path, *, model=None, layer=None, key_dim=None, num_experts=None) -> RoutingMemory:
        """Read a memory written by :meth:`save`. ``model``, ``layer``, ``key_dim`` and
        ``num_experts``, when given, must match the manifest, and the manifest the tensors. A
        missing file raises ``FileNotFoundError``; a truncated, corrupted, foreign or mismatched
        one ``ValueError`` naming the file, and nothing is loaded."""
        op = "RoutingMemory.load"
        tensors, manifest = read_tensors(path, kind=FORMAT, version=FORMAT_VERSION, op=op)
        keys, values = tensors.get("keys"), tensors.get("values")
        if keys is None or values is None or keys.dim() != 2 or values.dim() != 2:
            raise ValueError(f"{op}: {path} holds no (N, d) keys and (N, E) values")
        described = dict(num_entries=keys.shape[0], key_dim=keys.shape[1], num_experts=values.shape[1])
        for field, found in described.items():
            if manifest.get(field) != found:
                raise ValueError(f"{op}: {path}: the manifest's {field} is {manifest.get(field)!r}, its data {found}")
        metric, index = manifest.get("metric"), manifest.get("index")
        if metric not in METRICS or index not in INDEXES:
            raise ValueError(f"{op}: {path}: unknown metric / index {metric!r} / {index!r}")
        expected = dict(model=model, layer=layer, key_dim=key_dim, num_experts=num_experts)
        for field, want in expected.items():
            if want is not None and manifest.get(field) != want:
                raise ValueError(f"{op}: {path} was built for {field}={manifest.get(field)!r}, expected {want!r}")
        options = manifest.get("index_options")
        if not isinstance(options, dict) or not isinstance(manifest.get("model"), (str, type(None))):
            raise ValueError(f"{op}: {path}: index_options must be a dict and model a str or null in the manifest")
        memory = cls.__new__(cls)
        memory.keys, memory.values = keys, values
        memory.metric, memory.index_kind = metric, index
        memory.index_options = options
        memory.model, memory.layer = manifest["model"], manifest.get("layer")
        memory._faiss_index = None
        memory._gpu_indexes = {}
        if "faiss_index" in tensors:
            if faiss_available():
                import faiss

                memory._faiss_index = faiss.deserialize_index(tensors["faiss_index"].numpy())
                _set_search_options(memory._faiss_index, memory.index_kind, memory.index_options)
            else:
                warnings.warn(
                    "RoutingMemory.load: faiss is not installed; searching exactly with torch instead", stacklevel=2
                )
        return memory


def _check_tensor(name: str, tensor, dims: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"RoutingMemory: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"RoutingMemory: {name} must be a float tensor, got {tensor.dtype}")
    if tensor.dim() != dims:
        raise ValueError(f"RoutingMemory: {name} must be {dims}-D, got shape {tuple(tensor.shape)}")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1).contiguous()


def _exact_search(keys: torch.Tensor, queries: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``n`` inner products, ``SEARCH_CHUNK`` keys at a time (merging running top-n)."""
    best_sims = torch.full((queries.shape[0], 0), float("-inf"), device=queries.device)
    best_ids = torch.empty((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
    for start in range(0, keys.shape[0], SEARCH_CHUNK):
        chunk = queries @ keys[start : start + SEARCH_CHUNK].T
        ids = torch.arange(start, start + chunk.shape[1], device=queries.device).expand_as(chunk)
        sims = torch.cat([best_sims, chunk], dim=1)
        top = sims.topk(min(n, sims.shape[1]), dim=1)
        best_sims, best_ids = top.values, torch.cat([best_ids, ids], dim=1).gather(1, top.indices)
    return best_sims, best_ids


def _build_faiss_index(keys: torch.Tensor, kind: str, options: dict):
    import faiss

    data = keys.numpy()
    num_entries, dim = data.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(options.get("hnsw_m", 32)), faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = int(options.get("nlist", max(1, min(4 * int(num_entries**0.5), num_entries // 39 or 1))))
        quantizer = faiss.IndexFlatIP(dim)
        if kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:  # ivfpq: d / 8 one-byte codes per key, as in the kNN-MoE paper's setting
            m = int(options.get("m", max(1, dim // 8)))
            if dim % m:
                raise ValueError(f"RoutingMemory: index='ivfpq' needs m dividing d={dim}, got m={m}")
            if num_entries < PQ_MIN_ENTRIES:  # faiss trains 256 centroids per code book
                raise ValueError(
                    f"RoutingMemory: index='ivfpq' needs at least {PQ_MIN_ENTRIES} keys to train its 8-bit codes, "
                    f"got N={num_entries}; use index='flat' (exact) for a memory this small"
                )
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
            if _refine_factor(options):
                index = faiss.IndexRefineFlat(index)
        index.train(data)
    index.add(data)
    _set_search_options(index, kind, options)
    return index


def _refine_factor(options: dict) -> int:
    factor = options.get("refine", 0)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 0:
        raise ValueError(f"RoutingMemory: index_options['refine'] must be an int >= 0, got {factor!r}")
    return factor


def _set_search_options(index, kind: str, options: dict) -> None:
    if kind == "ivfpq" and _refine_factor(options):
        import faiss

        index.k_factor = float(_refine_factor(options))
        index = faiss.downcast_index(index.base_index)
    if kind in ("ivf", "ivfpq"):
        index.nprobe = int(options.get("nprobe", min(16, index.nlist)))
    elif kind == "hnsw":
        index.hnsw.efSearch = int(options.get("ef_search", 64))
