"""HF transformers integration (``moe_kernels.integrations.transformers``) on tiny random models.

For every supported family a 2-3 layer model is built from its config (no download), seeded, in
float32 and eval mode, with the family's routing features on: Qwen3-MoE renormalises and has a
dense layer, DeepSeek-V3 has 4 groups of which 2 are kept, a nonzero correction bias, scale 2.5
and a first dense layer, GPT-OSS has nonzero biases and pre-activations beyond its clamp at 7.
``initializer_range=0.15`` (about 1/sqrt(H)) makes the experts matter: zeroing them moves the
logits by 0.8-3, and scaling the routing weights by 0.999 moves them by 1e-3, a thousand times
the patched-vs-HF difference.

Measured on a CPU (reference backend), patched vs HF eager, float32: logits differ by at most
9e-7 (logits up to 3.5), parameter gradients of the LM + aux loss by at most 4.2e-7, everywhere
within 0.4x ``TOLERANCES[float32]``, so no looser bound is needed; the difference is summation
order only (the k-way combine, and the reference's grouped GEMM against HF's per-expert
``F.linear``). 16-bit MoE blocks against float64 (CPU path, HF in parentheses): at most 0.018
(0.021) in bf16 and 0.0017 (0.0020) in fp16, GPT-OSS, whose outputs reach 35, aside: 0.18 (0.35)
and 0.028 (0.027).

16-bit is compared per MoE block, not per model: bf16 router logits often tie exactly (8-bit
mantissa), HF's ``torch.topk`` then picks either expert (ours the lower id), and one flipped
expert in layer 1 changes everything after it. On tie-free tokens both blocks are judged against
the block in float64: the patched one's error is within twice HF's, the 16-bit rule of
``moe_kernels.testing`` (HF's eager block is plain PyTorch in the dtype; ours is the closer to
float64, since HF rounds every slot's weighted output to 16 bits before its ``index_add_``).
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers import assert_compile_matches_eager

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

import moe_kernels.integrations.transformers as hf
from moe_kernels.integrations.transformers.common import BACKEND, PACKED, SAVED
from moe_kernels.testing import TINY_HF_SIZES, assert_close, assert_within_plain, tiny_hf_config

FAMILIES = hf.SUPPORTED_MODEL_TYPES
# MoE layers of every family's tiny_hf_config (Qwen3-MoE and DeepSeek-V3: 3 layers, the first dense).
NUM_MOE_LAYERS = 2


def _build(family: str, dtype=torch.float32, experts_implementation="eager", overrides=None):
    torch.manual_seed(0)
    config = tiny_hf_config(family, overrides=overrides)
    model = AutoModelForCausalLM.from_config(config, experts_implementation=experts_implementation)
    model = model.to(dtype).eval()
    gen = torch.Generator().manual_seed(1)

    def rand(tensor, std):
        return (torch.randn(tensor.shape, generator=gen) * std).to(tensor.dtype)

    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:  # selection-only bias, comparable to the spread of the sigmoid scores
                bias.copy_(rand(bias, 0.05))
            if type(module).__name__ == "GptOssExperts":
                module.gate_up_proj.mul_(6.0)  # ~10% of gates above 7, ~20% of ups beyond +-7: clamps active
                module.gate_up_proj_bias.copy_(rand(module.gate_up_proj_bias, 0.5))
                module.down_proj_bias.copy_(rand(module.down_proj_bias, 0.1))
    return model


def _blocks(model, family):
    name, router_attr = hf.FAMILIES[family].block, hf.FAMILIES[family].router_attr
    return [(m, getattr(m, router_attr), m.experts) for m in model.modules() if type(m).__name__ == name]


def _first_block(family: str, dtype=torch.float32, *, seed: int):
    """The family's model in ``dtype``, its first MoE block and that block's router, and
    ``hidden (256, H)`` random rows of ``dtype`` drawn from ``seed``."""
    model = _build(family, dtype)
    block, router, _ = _blocks(model, family)[0]
    hidden = torch.randn(256, TINY_HF_SIZES["hidden_size"], generator=torch.Generator().manual_seed(seed)).to(dtype)
    return model, block, router, hidden


def _input_ids(batch=2, seq=12, seed=2):
    return torch.randint(0, TINY_HF_SIZES["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _no_instance_forwards(model) -> bool:
    return all("forward" not in m.__dict__ and SAVED not in m.__dict__ for m in model.modules())


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: see conftest.py


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the two ops the patched forwards make."""
    calls = {"softmax_topk": 0, "fused_experts": 0}

    def wrap(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    wrap(hf.routers, "softmax_topk")
    wrap(hf.experts, "fused_experts")
    return calls


def _dense(weights, ids, num_experts):
    """Routing as a dense (T, E) float64 matrix: order-insensitive comparison of the k slots."""
    flat_ids = ids.reshape(-1, ids.shape[-1]).long()
    flat_w = weights.reshape(-1, weights.shape[-1]).double()
    return torch.zeros(flat_ids.shape[0], num_experts, dtype=torch.float64).scatter(1, flat_ids, flat_w)


def _tie_free(router_logits, k):
    """Tokens whose k-th and (k+1)-th largest router logits differ: their top-k set is unique."""
    top = router_logits.float().topk(min(k + 1, router_logits.shape[-1]), dim=-1).values
    return top[:, k - 1] != top[:, -1] if top.shape[-1] > k else torch.ones(top.shape[0], dtype=torch.bool)


# ---------------------------------------------------------------------------------------------


def test_importing_does_not_import_transformers():
    code = (
        "import sys, moe_kernels, moe_kernels.integrations.transformers as m; "
        "assert 'transformers' not in sys.modules, 'imported transformers'; "
        "assert not hasattr(m, 'transformers')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_model_matches_hf(family, spy):
    model = _build(family)
    ids = _input_ids()
    params_before = [(n, id(p)) for n, p in model.named_parameters()]
    keys_before = list(model.state_dict())

    ref = model(ids, labels=ids, output_router_logits=True)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref_tokens = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref_logits = _logits(model, ids)
    assert spy == {"softmax_topk": 0, "fused_experts": 0}

    assert hf.apply_moe_kernels(model) is model
    assert hf.is_moe_kernels_applied(model)
    blocks = _blocks(model, family)
    assert len(blocks) == NUM_MOE_LAYERS
    for _, router, experts in blocks:  # forwards patched on the instances; parameters shared
        assert "forward" in router.__dict__ and "forward" in experts.__dict__
    assert [(n, id(p)) for n, p in model.named_parameters()] == params_before
    assert list(model.state_dict()) == keys_before

    out = model(ids, labels=ids, output_router_logits=True)
    num_moe = NUM_MOE_LAYERS
    assert spy == {"softmax_topk": num_moe, "fused_experts": num_moe}
    out.loss.backward()

    assert_close(out.logits, ref.logits, dtype=torch.float32, msg=f"{family} logits")
    assert_close(out.loss, ref.loss, dtype=torch.float32, msg=f"{family} loss")
    if getattr(ref, "router_logits", None) is not None:  # DeepSeek-V3 of 5.13 does not return them
        # The first MoE layer sees the same input, so the same router logits bit for bit.
        assert torch.equal(out.router_logits[0], ref.router_logits[0])
        for got, want in zip(out.router_logits, ref.router_logits, strict=True):
            assert_close(got, want, dtype=torch.float32, msg=f"{family} router_logits")
    for name, param in model.named_parameters():
        if name not in ref_grads:
            assert param.grad is None, name
            continue
        assert param.grad is not None, name
        assert_close(param.grad, ref_grads[name], dtype=torch.float32, msg=f"{family} grad of {name}")

    tokens = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 14)
    assert torch.equal(tokens, ref_tokens)

    assert hf.revert_moe_kernels(model) is model
    assert not hf.is_moe_kernels_applied(model)
    assert _no_instance_forwards(model)
    calls = dict(spy)
    assert torch.equal(_logits(model, ids), ref_logits)
    assert spy == calls  # reverted: HF's code only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_router_matches_hf(family, dtype):
    model, _, router, hidden = _first_block(family, dtype, seed=3)
    with torch.no_grad():
        ref_logits, ref_w, ref_ids = type(router).forward(router, hidden)
        hf.apply_moe_kernels(model)
        logits, weights, ids = router(hidden)
    assert torch.equal(logits, ref_logits)
    assert weights.dtype == ref_w.dtype and ids.dtype == ref_ids.dtype == torch.int64
    assert weights.shape == ref_w.shape and ids.shape == ref_ids.shape
    keep = _tie_free(ref_logits, router.top_k)
    assert keep.float().mean() > 0.8
    num_experts = ref_logits.shape[-1]
    got, want = _dense(weights, ids, num_experts)[keep], _dense(ref_w, ref_ids, num_experts)[keep]
    assert torch.equal(got != 0, want != 0)  # same experts
    assert_close(got, want, dtype=dtype, msg=f"{family} routing weights")


def test_deepseek_v3_group_masking_with_negative_keys():
    """All keys below 0 (bias -1): masking dropped groups with 0.0 (HF <= 5.0, DeepSeek's first
    reference code) would pick experts of dropped groups; -inf (our op, HF >= 5.12) never does."""
    model, _, router, hidden = _first_block("deepseek_v3", seed=4)
    with torch.no_grad():
        router.e_score_correction_bias.sub_(1.0)
        _, ref_w, ref_ids = type(router).forward(router, hidden)
        hf.apply_moe_kernels(model)
        logits, weights, ids = router(hidden)
    num_experts = logits.shape[-1]
    assert_close(_dense(weights, ids, num_experts), _dense(ref_w, ref_ids, num_experts), dtype=torch.float32)

    # The case discriminates: a 0.0 fill would select other experts for some tokens.
    scores = logits.sigmoid()
    keys = scores + router.e_score_correction_bias
    group_keys = keys.view(-1, router.num_group, num_experts // router.num_group)
    kept = group_keys.topk(2, dim=-1).values.sum(-1).topk(router.topk_group, dim=-1).indices
    mask = torch.zeros_like(group_keys[..., 0]).scatter(1, kept, 1.0).bool()
    mask = mask.repeat_interleave(num_experts // router.num_group, dim=1)
    zero_filled = keys.masked_fill(~mask, 0.0).topk(router.top_k, dim=-1).indices
    assert not torch.equal(zero_filled.sort(-1).values, ids.sort(-1).values)
    in_dropped_group = ~mask.gather(1, ids)
    assert not in_dropped_group.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_block_16bit_matches_hf(family, dtype):
    # HF's 16-bit block is plain PyTorch in the dtype: the patched block's error against the same
    # block in float64 is within twice HF's (on the tokens whose top-k is the same in both).
    model, block, router, hidden = _first_block(family, dtype, seed=5)
    block64 = copy.deepcopy(block).double()
    router64 = next(m for m in block64.modules() if type(m) is type(router))
    with torch.no_grad():
        logits = type(router).forward(router, hidden)[0]
        top = logits.float().topk(router.top_k, dim=-1).indices.sort(-1).values
        top64 = type(router).forward(router64, hidden.double())[0].topk(router.top_k, dim=-1).indices.sort(-1).values
        keep = _tie_free(logits, router.top_k) & (top == top64).all(-1)
        hidden = hidden[keep][None]  # (1, T', H)
        ref = block(hidden)
        ref64 = block64(hidden.double())
        hf.apply_moe_kernels(model)
        out = block(hidden)
    assert keep.sum() > 100
    if isinstance(ref, tuple):  # GPT-OSS returns (hidden, router_scores)
        assert_close(out[1], ref[1], dtype=dtype, msg=f"{family} router scores")
        assert out[1].dtype == ref[1].dtype
        out, ref, ref64 = out[0], ref[0], ref64[0]
    assert out.dtype == ref.dtype == dtype
    assert_within_plain(out, ref, ref64, msg=f"{family} {dtype} block output")


@pytest.fixture
def registered():
    from transformers.integrations.moe import ExpertsInterface

    had = ExpertsInterface._global_mapping.get(hf.EXPERTS_IMPLEMENTATION)
    yield hf.register_experts_implementation()
    if had is None:
        ExpertsInterface._global_mapping.pop(hf.EXPERTS_IMPLEMENTATION, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_implementation_hook(family, registered, spy):
    assert registered == "moe_kernels"
    ids = _input_ids()
    eager = _build(family)
    ref = eager(ids, labels=ids)
    ref.loss.backward()

    model = _build(family, experts_implementation="moe_kernels")  # same seed, same weights
    assert model.config._experts_implementation == "moe_kernels"
    out = model(ids, labels=ids)
    out.loss.backward()
    num_moe = NUM_MOE_LAYERS
    assert spy == {"softmax_topk": 0, "fused_experts": num_moe}  # the routers stay HF's
    assert_close(out.logits, ref.logits, dtype=torch.float32)
    grads = dict(eager.named_parameters())
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert_close(param.grad, grads[name].grad, dtype=torch.float32, msg=name)

    eager.set_experts_implementation("moe_kernels")  # switching a loaded model
    assert_close(_logits(eager, ids), ref.logits, dtype=torch.float32)
    assert spy["fused_experts"] == 2 * num_moe
    eager.set_experts_implementation("eager")
    assert torch.equal(_logits(eager, ids), ref.logits.detach())
    assert spy["fused_experts"] == 2 * num_moe


def test_experts_implementation_falls_back_for_unsupported_experts(registered, spy):
    model = _build("mixtral")
    ids = _input_ids()
    for _, _, experts in _blocks(model, "mixtral"):
        experts.act_fn = torch.nn.ReLU()  # not an activation of fused_experts
    ref = _logits(model, ids)
    model.set_experts_implementation("moe_kernels")
    hf.experts._warned_fallback.discard("MixtralExperts")
    with pytest.warns(UserWarning, match="grouped_mm"):
        out = _logits(model, ids)
    assert spy["fused_experts"] == 0
    assert_close(out, ref, dtype=torch.float32)
    with pytest.raises(ValueError, match="ReLU"):
        hf.apply_moe_kernels(model)
    assert not hf.is_moe_kernels_applied(model)


def test_reapply_and_revert():
    model = _build("qwen2_moe")
    ids = _input_ids()
    ref = _logits(model, ids)
    hf.apply_moe_kernels(model, backend="torch")
    hf.apply_moe_kernels(model)  # replaces the first patch
    _, router, experts = _blocks(model, "qwen2_moe")[0]
    assert router.__dict__[BACKEND] == experts.__dict__[BACKEND] == "auto"
    assert_close(_logits(model, ids), ref, dtype=torch.float32)
    hf.revert_moe_kernels(model)
    hf.revert_moe_kernels(model)  # no-op
    assert _no_instance_forwards(model)
    assert torch.equal(_logits(model, ids), ref)


def test_transposed_expert_weights_are_relaid_once_and_restored():
    """GPT-OSS's (E, H, 2I) / (E, I, H) Parameters would reach fused_experts as strided views,
    which oneDNN's 16-bit GEMMs reorder on every call: on the CPU the patch re-lays them (same
    shapes and values, strides only) so the views are contiguous; revert makes the Parameters
    contiguous again and HF's forward gives exactly the logits it gave before. Contiguous
    families are left alone."""
    model = _build("gpt_oss")
    ids = _input_ids()
    ref = _logits(model, ids)
    experts = [block[2] for block in _blocks(model, "gpt_oss")]
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    assert not any(view.is_contiguous() for e in experts for view in hf.experts.expert_weights(e))
    hf.apply_moe_kernels(model)
    assert all(view.is_contiguous() for e in experts for view in hf.experts.expert_weights(e))
    for name, param in model.named_parameters():
        assert param.shape == before[name].shape and torch.equal(param, before[name]), name
    assert_close(_logits(model, ids), ref, dtype=torch.float32)
    hf.revert_moe_kernels(model)
    assert all(param.is_contiguous() for param in model.parameters())
    assert torch.equal(_logits(model, ids), ref)
    mixtral = _build("mixtral")
    hf.apply_moe_kernels(mixtral)
    assert not any(PACKED in module.__dict__ for module in mixtral.modules())


def test_patch_inside_accelerate_style_hooks():
    """With accelerate's hooks (``device_map``) ``forward`` is an instance wrapper calling
    ``_old_forward``: the patch goes inside, so the wrapper keeps running, and revert restores it."""
    model = _build("mixtral")
    ids = _input_ids()
    ref = _logits(model, ids)
    _, router, _ = _blocks(model, "mixtral")[0]
    entered = []
    router._old_forward = router.forward

    def wrapper(*args, **kwargs):
        entered.append(1)
        return router._old_forward(*args, **kwargs)

    router.forward = wrapper
    hf.apply_moe_kernels(model)
    assert router.forward is wrapper and router._old_forward.__func__ is hf.routers.mixtral_router_forward
    assert_close(_logits(model, ids), ref, dtype=torch.float32)
    assert entered
    hf.revert_moe_kernels(model)
    assert router.forward is wrapper and router._old_forward.__func__ is type(router).forward


def test_errors(monkeypatch):
    supported = "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss"
    with pytest.raises(ValueError, match=f"'llama' is not supported; supported model types: {supported}"):
        hf.apply_moe_kernels(
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
                )
            )
        )
    with pytest.raises(ValueError, match="backend"):
        hf.apply_moe_kernels(_build("mixtral"), backend="cuda")
    # GPT-OSS with another clamp limit (config.swiglu_limit, which 5.13-5.18 ignore): the op's
    # activation is fixed at 7.0 / 1.702.
    model = _build("gpt_oss")
    _blocks(model, "gpt_oss")[-1][2].limit = 5.0
    with pytest.raises(ValueError, match="limit/alpha"):
        hf.apply_moe_kernels(model)
    assert not hf.is_moe_kernels_applied(model)
    # No MoE block at all.
    with pytest.raises(ValueError, match="no Qwen2MoeSparseMoeBlock"):
        hf.apply_moe_kernels(_build("qwen2_moe", overrides={"mlp_only_layers": [0, 1]}))
    # A router laid out otherwise (another transformers release): refused, nothing patched.
    model = _build("deepseek_v3")
    del _blocks(model, "deepseek_v3")[-1][1].routed_scaling_factor
    with pytest.raises(ImportError, match=r"transformers>=5\.13.*routed_scaling_factor"):
        hf.apply_moe_kernels(model)
    assert not hf.is_moe_kernels_applied(model)
    # transformers too old for the fused experts layout, or missing.
    model = _build("mixtral")
    for version in ("4.57.1", "5.12.0"):
        # The live module: transformers' lazy module may have been re-created in sys.modules.
        monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
        with pytest.raises(ImportError, match=rf"needs transformers>=5\.13.*found transformers {version}"):
            hf.apply_moe_kernels(model)
        with pytest.raises(ImportError, match=r"transformers>=5\.13"):
            hf.register_experts_implementation()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"moe-kernels\[hf\]"):
        hf.apply_moe_kernels(model)
    assert not hf.is_moe_kernels_applied(model)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_patched_model_compiles_fullgraph_with_dynamic_tokens(family):
    """A patched model compiles with ``fullgraph=True`` (so nothing of this package, nor of the
    model, breaks the graph) and ``dynamic=True``: new sequence lengths reuse the graph (a
    recompile raises) and give the eager logits. The three families cover the softmax gate,
    the grouped sigmoid gate with bias and shared expert, and the biased interleaved experts."""
    model = _build(family)
    hf.apply_moe_kernels(model)
    inputs = [(_input_ids(2, seq, seed=seq),) for seq in (5, 11, 12)]
    with torch.no_grad():
        assert_compile_matches_eager(
            lambda ids: model(ids).logits, *inputs, dynamic=True, no_recompile=True, op="whole_model"
        )


@pytest.mark.kernel
@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_patched_model_triton_backend(family, kernel_device):
    """The Triton kernels inside a patched model: DeepSeek-V3's grouped sigmoid routing, GPT-OSS's
    transposed weight views, interleaved clamped activation and biases."""
    model = _build(family).to(kernel_device)
    ids = _input_ids(1, 6).to(kernel_device)
    ref = model(ids, labels=ids)
    ref.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    hf.apply_moe_kernels(model, backend="triton")
    out = model(ids, labels=ids)
    out.loss.backward()
    assert_close(out.logits, ref.logits, dtype=torch.float32, op="whole_model")
    for name, param in model.named_parameters():
        if name in grads:
            assert_close(param.grad, grads[name], dtype=torch.float32, op="whole_model", msg=name)


@pytest.mark.gpu
@pytest.mark.kernel
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_patched_decode_step_captures_in_a_cuda_graph(family):
    """A decode-sized forward of a patched model is captured once and replayed with new tokens:
    the patched routers and experts make no host sync and allocate fixed shapes."""
    model = _build(family).to("cuda", torch.bfloat16)
    hf.apply_moe_kernels(model)
    static_ids = _input_ids(4, 1).cuda()
    with torch.no_grad():
        model(static_ids)  # compile the kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = model(static_ids).logits
        fresh = _input_ids(4, 1, seed=7).cuda()
        static_ids.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        want = model(fresh).logits
    assert_close(static_logits, want, dtype=torch.bfloat16, op="fused_experts")
