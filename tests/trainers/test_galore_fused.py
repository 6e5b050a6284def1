"""The fused GaLore optimizer computes galore-torch's GaLoreAdamW8bit update (8-bit states, SVD
refreshes, scale, weight decay), layer-wise or not, on the tiny models."""

from __future__ import annotations

import copy

import pytest
import torch


def _model(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw_8bit_layerwise", use_cpu=True,
                             optim_target_modules=["self_attn", "mlp"], learning_rate=1e-3, report_to="none",
                             optim_args="rank=64, update_proj_gap=2, scale=0.5, proj_type=std", **kw)  # fmt: skip


def _batches(vocab, n=5):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (2, 24), generator=g) for _ in range(n)]


def _library_step(model, optimizers, x):
    model(input_ids=x, labels=x).loss.backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("model_dir", ["tiny_smollm_dir", "tiny_gemma_dir"])
def test_fused_matches_library(model_dir, layerwise, request, tmp_path):
    from galore_torch import GaLoreAdamW8bit

    from duetto.trainers.compat import guard_galore_cuda_synchronize
    from duetto.trainers.galore_fused import FusedGaLoreAdamW8bit, hf_galore_param_groups

    guard_galore_cuda_synchronize()
    ref = _model(request.getfixturevalue(model_dir))
    fused_model = copy.deepcopy(ref)
    args = _args(tmp_path, weight_decay=0.1)
    groups, defaults, quirks = hf_galore_param_groups(args, ref)
    assert any("rank" in g for g in groups) and defaults["weight_decay"] == pytest.approx(0.01)  # the library's default
    assert quirks == {"max_unorm": 100.0, "skip_zeros": True}  # galore-torch 1.0's positional arguments
    # the reference: one library optimizer per weight, as HF's layer-wise set-up builds them
    ref_opts = []
    for g in groups:
        for p in g["params"]:
            ref_opts.append(GaLoreAdamW8bit([{**{k: v for k, v in g.items() if k != "params"}, "params": [p]}]))
    names = {id(p): n for n, p in ref.named_parameters()}
    by_name = dict(fused_model.named_parameters())
    fused_groups = [{**g, "params": [by_name[names[id(p)]] for p in g["params"]]} for g in groups]
    fused = FusedGaLoreAdamW8bit(fused_groups, layerwise=layerwise, defaults=defaults, quirks=quirks)
    assert fused.projected and fused.plain

    for x in _batches(ref.config.vocab_size):  # 5 steps: SVD refreshes at steps 0, 2 and 4
        _library_step(ref, ref_opts, x)
        fused_model(input_ids=x, labels=x).loss.backward()
        if layerwise:  # the hooks have projected and freed the GaLore gradients
            assert all(p.grad is None for pg in fused.projected for p in pg.params)
        fused.step()
        fused.zero_grad(set_to_none=True)
    assert fused.steps_done == 5
    for (name, a), b in zip(ref.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    start = dict(_model(request.getfixturevalue(model_dir)).named_parameters())
    trained = {n for n, p in fused_model.named_parameters() if not torch.equal(p, start[n])}
    # rank 64 leaves q/gate/up/down with 8-bit low-rank states (>= 4096 values): they train, stacked by shape
    expected = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight"}
    if model_dir == "tiny_smollm_dir":  # Gemma's norms start at 0 (scale 1 + w): max_unorm x 0 keeps them there
        expected.add("model.norm.weight")
    assert expected <= trained, expected - trained
    assert any(len(pg.params) > 1 and pg.adam.eight_bit for pg in fused.projected)


def test_state_dict_round_trip_resumes_exactly(tiny_smollm_dir, tmp_path):
    from duetto.trainers.galore_fused import FusedGaLoreAdamW8bit, hf_galore_param_groups

    def build():
        m = _model(tiny_smollm_dir)
        groups, defaults, quirks = hf_galore_param_groups(_args(tmp_path), m)
        return m, FusedGaLoreAdamW8bit(groups, layerwise=True, defaults=defaults, quirks=quirks)

    xs = _batches(_model(tiny_smollm_dir).config.vocab_size, 4)
    a, opt_a = build()
    for x in xs:
        a(input_ids=x, labels=x).loss.backward()
        opt_a.step()
        opt_a.zero_grad()
    b, opt_b = build()
    for x in xs[:2]:
        b(input_ids=x, labels=x).loss.backward()
        opt_b.step()
        opt_b.zero_grad()
    saved_weights, saved_opt = copy.deepcopy(b.state_dict()), copy.deepcopy(opt_b.state_dict())
    c, opt_c = build()
    c.load_state_dict(saved_weights)
    opt_c.load_state_dict(saved_opt)
    for x in xs[2:]:
        c(input_ids=x, labels=x).loss.backward()
        opt_c.step()
        opt_c.zero_grad()
    for pa, pc in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(pc, pa, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a fused GaLore checkpoint"):
        opt_c.load_state_dict({"state": {}, "param_groups": []})


def test_full_projection_has_no_fused_form():
    from duetto.trainers.galore_fused import projection_side

    assert projection_side((8, 4), "std") == "right" and projection_side((4, 8), "std") == "left"
    assert projection_side((8, 4), "reverse_std") == "left"
    with pytest.raises(ValueError, match="proj_type"):
        projection_side((8, 4), "full")


def _small_weights_against_bitsandbytes(device, dtype, *, max_unorm, weight_decay, atol):
    """The small weights' torch step against bitsandbytes' 32-bit Adam on each weight alone: a weight
    with zero gradient entries, one without a gradient at one step, updates clipped where max_unorm is small."""
    import bitsandbytes.functional as F

    from duetto.trainers.galore_fused import _SmallGroup

    g = torch.Generator().manual_seed(0)
    start = [torch.rand(96, generator=g) + 0.5 for _ in range(3)]
    params = [torch.nn.Parameter(w.to(device, dtype)) for w in start]
    ref = [w.to(device, dtype) for w in start]
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 1e-2, "weight_decay": weight_decay}
    small = _SmallGroup(params, group, {"max_unorm": max_unorm, "skip_zeros": True})
    states = [(torch.zeros(96, device=device), torch.zeros(96, device=device)) for _ in ref]
    for step in range(1, 5):
        grads = [torch.randn(96, generator=g).to(device, dtype) for _ in ref]
        grads[0][:10] = 0  # skipped on CUDA (skip_zeros), stepped on the CPU, as bitsandbytes does each
        for i, (p, grad) in enumerate(zip(params, grads)):
            p.grad = None if (step == 2 and i == 1) else grad.clone()
        small.step(step)
        for i, (w, grad, (s1, s2)) in enumerate(zip(ref, grads, states)):
            if step == 2 and i == 1:
                continue  # no gradient: the library skips the weight
            F.optimizer_update_32bit("adam", grad, w, s1, 0.9, 1e-8, step, 1e-2, s2, 0.999, 0.0, 0.0, weight_decay,
                                     1.0, torch.zeros(1, device=device), max_unorm=max_unorm, skip_zeros=True)  # fmt: skip
        for i, (p, w) in enumerate(zip(params, ref)):
            torch.testing.assert_close(p.detach(), w, rtol=0, atol=atol, msg=lambda m: f"step {step}, weight {i}: {m}")
        for (s1, s2), a, b in zip(states, small.state1, small.state2):
            torch.testing.assert_close(a, s1, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(b, s2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("max_unorm", [100.0, 0.001])  # 0.001: every update clipped
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_small_weights_step_as_bitsandbytes_on_cpu(max_unorm, weight_decay):
    _small_weights_against_bitsandbytes("cpu", torch.float32, max_unorm=max_unorm, weight_decay=weight_decay, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_unorm", [100.0, 0.001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_weights_step_as_bitsandbytes_on_cuda(max_unorm, dtype):
    # float arithmetic in another order than the kernel's (fused multiply-adds): in float32 within 1e-5,
    # far below a step's decay (lr x weight_decay x w = 1e-3) or update (~1e-2); in bf16 within a unit
    # of the last place
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    _small_weights_against_bitsandbytes("cuda", dtype, max_unorm=max_unorm, weight_decay=0.1, atol=atol)
