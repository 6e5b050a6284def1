"""The static-shape LLM.int8 matmul against bitsandbytes' MatMul8bitLt on the same inputs (CPU here; the
`gpu` tests in test_fast_path_gpu.py run both on CUDA)."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from duetto.trainers.int8_static import StaticLinear8bitLt, StaticMatMul8bitLt, use_static_int8  # noqa: E402


def _library(A, CB, SCB, bias, threshold):
    from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState

    state = MatmulLtState()
    state.has_fp16_weights, state.is_training, state.threshold = False, True, threshold
    state.CB, state.SCB = CB, SCB
    dummy = torch.empty(CB.shape, dtype=torch.int8)  # a frozen int8 weight: the state holds it
    return MatMul8bitLt.apply(A, dummy, None, bias, state)


def _case(seed: int, outlier_cols=(3, 17), rows=24, k=64, n=48, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.05
    CB, SCB, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(W.half(), 0.0)
    A = torch.randn(2, rows // 2, k, generator=g)
    for c in outlier_cols:  # an outlier in a few rows of each such column, other rows of it stay small
        A[0, 1, c] = 9.0
        A[1, 2, c] = -7.5
    return A.to(dtype), CB, SCB


@pytest.mark.parametrize("outlier_cols", [(3, 17), ()], ids=["outliers", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_bitsandbytes_forward_and_gradients(outlier_cols, with_bias, dtype):
    A, CB, SCB = _case(0, outlier_cols, dtype=dtype)
    bias = torch.randn(CB.shape[0]).to(dtype) if with_bias else None
    grad = torch.randn(*A.shape[:-1], CB.shape[0], generator=torch.Generator().manual_seed(1)).to(dtype)
    outs = []
    for fn in (_library, StaticMatMul8bitLt.apply):
        a = A.clone().requires_grad_(True)
        b = None if bias is None else bias.clone().requires_grad_(True)
        out = fn(a, CB, SCB, b, 6.0)
        out.backward(grad)
        outs.append((out.detach(), a.grad, None if b is None else b.grad))
    (lib_out, lib_grad, lib_bias), (ours_out, ours_grad, ours_bias) = outs
    assert ours_out.shape == lib_out.shape == (*A.shape[:-1], CB.shape[0]) and ours_out.dtype == lib_out.dtype
    # the same ops on the same numbers: equal on CPU (on CUDA the outlier products may sum in another order)
    torch.testing.assert_close(ours_out, lib_out, rtol=0, atol=0)
    torch.testing.assert_close(ours_grad, lib_grad, rtol=0, atol=0)
    if with_bias:
        torch.testing.assert_close(ours_bias, lib_bias, rtol=0, atol=0)
    if outlier_cols:  # the outlier part matters: without it the answer is far off
        no_outliers = StaticMatMul8bitLt.apply(A.masked_fill(A.abs() >= 6.0, 0.0), CB, SCB, bias, 6.0).float()
        assert (no_outliers - lib_out.float()).abs().max() > 0.1


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (1, 1, 64)], ids=["one-row", "2-d", "one-row-3-d"])
def test_matches_bitsandbytes_on_other_shapes(shape):
    _, CB, SCB = _case(3)
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 3  # some values above 6.0
    A.view(-1, 64)[0, 7] = 6.0  # exactly the threshold: an outlier for both
    A = A.to(torch.bfloat16)
    torch.testing.assert_close(StaticMatMul8bitLt.apply(A, CB, SCB, None, 6.0), _library(A, CB, SCB, None, 6.0),
                               rtol=0, atol=0)  # fmt: skip
    empty = StaticMatMul8bitLt.apply(A[..., :0, :], CB, SCB, None, 6.0)
    assert empty.shape == (*shape[:-2], 0, CB.shape[0])


def test_threshold_zero_is_the_plain_int8_matmul():
    A, CB, SCB = _case(2)
    torch.testing.assert_close(StaticMatMul8bitLt.apply(A, CB, SCB, None, 0.0).float(),
                               _library(A, CB, SCB, None, 0.0).float(), rtol=0, atol=0)  # fmt: skip


def test_model_layers_answer_as_before(tiny_gemma_dir, monkeypatch):
    """A tiny model's 8-bit base gives the same logits through the static matmul as through bitsandbytes'
    MatMul8bitLt (its eval path on CPU; the layers take the static matmul when training on CUDA, forced
    here). A few channels of each attention input are scaled up so that the outlier columns are in play."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 dtype=torch.bfloat16, device_map={"": "cpu"})  # fmt: skip
    model.eval()
    largest = []
    for layer in model.model.layers:
        layer.input_layernorm.weight.data[:3] = 30.0  # Gemma's norm scales by 1 + weight
        layer.self_attn.q_proj.register_forward_pre_hook(lambda m, args: largest.append(args[0].abs().max().item()))
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
        n = use_static_int8(model)
        assert model(input_ids=ids).logits.float().equal(before)  # eval: the library's own forward
        monkeypatch.setattr(StaticLinear8bitLt, "uses_static", lambda self, x: True)
        after = model(input_ids=ids).logits.float()
    assert max(largest) >= 6.0  # outliers: bitsandbytes' 16-bit part runs
    assert n == sum(isinstance(m, StaticLinear8bitLt) for m in model.modules()) > 0
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # training on a CPU keeps bitsandbytes' forward (it trains through another matmul there)
    monkeypatch.undo()
    model.train()
    trained = model(input_ids=ids).logits
    for m in model.modules():
        if isinstance(m, StaticLinear8bitLt):
            m.__class__ = bnb.nn.Linear8bitLt
    torch.testing.assert_close(trained, model(input_ids=ids).logits, rtol=0, atol=0)


def test_refuses_a_layer_with_16_bit_weights():
    layer = bnb.nn.Linear8bitLt(16, 8, bias=False, has_fp16_weights=True)
    with pytest.raises(ValueError, match="16 bits"):
        use_static_int8(torch.nn.Sequential(layer))


@pytest.mark.parametrize("outlier_cols", [(3, 17), ()], ids=["outliers", "none"])
def test_under_autocast_the_outlier_product_follows_autocast_as_the_librarys(outlier_cols):
    """Under bf16 autocast over fp32 inputs (a QLoRA step over an upcast base) bitsandbytes' outlier addmm
    runs in bf16; ours too, added to the fp32 int8 part: the result stays fp32 either way, equal to the
    library's within bf16 rounding, and the input's gradient (fp32 in both) is the library's exactly."""
    A, CB, SCB = _case(5, outlier_cols, dtype=torch.float32)
    # bf16 numbers: the library's bf16 output (with outliers) hands its backward the same gradient
    grad = torch.randn(*A.shape[:-1], CB.shape[0], generator=torch.Generator().manual_seed(6)).bfloat16().float()
    outs = []
    for fn in (_library, StaticMatMul8bitLt.apply):
        a = A.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(a, CB, SCB, None, 6.0)
        out.float().backward(grad)
        outs.append((out.detach(), a.grad))
    (lib_out, lib_grad), (ours_out, ours_grad) = outs
    assert ours_out.dtype == torch.float32
    torch.testing.assert_close(ours_out, lib_out.float(), rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(ours_grad, lib_grad, rtol=0, atol=0)
    if outlier_cols:  # the outlier part in bf16: not the fp32 product
        with torch.autocast("cpu", enabled=False):
            fp32 = StaticMatMul8bitLt.apply(A, CB, SCB, None, 6.0)
        assert not torch.equal(ours_out, fp32)
        torch.testing.assert_close(ours_out, fp32, rtol=1e-2, atol=2e-2)
