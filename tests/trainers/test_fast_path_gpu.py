"""The GPU fast path computes what the plain step computes: a replayed CUDA graph gives the eager
step's losses and weights, the fused GaLore optimizer the library's on CUDA, and a trial takes the
fast path by default on a GPU. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def _model(path, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda()
    m.config.use_cache = False
    return m


def _batches(vocab, n=8):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (2, 32), generator=g).cuda() for _ in range(n)]


def test_graph_replay_matches_eager_steps(tiny_smollm_dir):
    from duetto.trainers.graph_step import GraphedStep

    eager = _model(tiny_smollm_dir, torch.float32)
    graphed = copy.deepcopy(eager)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3, fused=True)
    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, fused=True)
    step = GraphedStep(graphed, autocast_bf16=False, warmup_steps=2)
    losses_e, losses_g = [], []
    for x in _batches(eager.config.vocab_size):
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
        loss = eager(**batch).loss
        loss.backward()
        opt_e.step()
        opt_e.zero_grad(set_to_none=True)
        losses_e.append(loss.item())
        losses_g.append(step(batch).item())
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
    assert step.graph is not None and step.replays >= 5 and step.failed is None
    torch.testing.assert_close(torch.tensor(losses_g), torch.tensor(losses_e), rtol=1e-4, atol=1e-4)
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_refreshes_on_streams_equal_the_library_call():
    from duetto.trainers.refresh_pool import RefreshPool

    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) for s in [(96, 64), (64, 160)] * 12]
    library = [torch.linalg.svd(x.float(), full_matrices=False) for x in grads]  # GaLoreProjector's call
    out = [None] * len(grads)
    pool = RefreshPool(torch.device("cuda"), workers=4)

    def keep(i, x):
        out[i] = torch.linalg.svd(x.float(), full_matrices=False)

    for i, x in enumerate(grads):
        pool.submit(lambda x, i=i: keep(i, x), lambda x: None, x)
    pool.wait()
    pool.close()
    for (u, s, vh), (ru, rs, rvh) in zip(out, library):
        assert torch.equal(u, ru) and torch.equal(s, rs) and torch.equal(vh, rvh)


@pytest.mark.parametrize("layerwise", [True, False])
def test_fused_galore_matches_library_on_cuda(tiny_smollm_dir, tmp_path, layerwise):
    """One projection refresh (step 0, through the CUDA refresh pool) and four plain steps. A second
    refresh would take the SVD of gradients that already differ by the rounding of a batched matmul,
    and the tiny model's trailing singular vectors are ill-conditioned: with a refresh every 2 steps
    both runs stay GaLore but part ways (q_proj 67% of its movement apart on an H100, 2026-12-06)."""
    from galore_torch import GaLoreAdamW8bit
    from transformers import TrainingArguments

    from duetto.trainers.galore_fused import FusedGaLoreAdamW8bit, hf_galore_param_groups

    ref = _model(tiny_smollm_dir, torch.float32)
    fused_model = copy.deepcopy(ref)
    args = TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw_8bit_layerwise", report_to="none",
                             optim_target_modules=["self_attn", "mlp"], learning_rate=1e-3,
                             optim_args="rank=64, update_proj_gap=100, scale=0.5, proj_type=std")  # fmt: skip
    groups, defaults, quirks = hf_galore_param_groups(args, ref)
    ref_opts = [GaLoreAdamW8bit([{**{k: v for k, v in g.items() if k != "params"}, "params": [p]}])
                for g in groups for p in g["params"]]  # fmt: skip
    names = {id(p): n for n, p in ref.named_parameters()}
    by_name = dict(fused_model.named_parameters())
    fused = FusedGaLoreAdamW8bit([{**g, "params": [by_name[names[id(p)]] for p in g["params"]]} for g in groups],
                                 layerwise=layerwise, defaults=defaults, quirks=quirks)  # fmt: skip
    for x in _batches(ref.config.vocab_size, 5):
        ref(input_ids=x, labels=x).loss.backward()
        for o in ref_opts:
            o.step()
            o.zero_grad(set_to_none=True)
        fused_model(input_ids=x, labels=x).loss.backward()
        fused.step()
        fused.zero_grad(set_to_none=True)
    # Adam normalises each element's gradient, so rounding differences of a batched matmul against
    # per-weight ones change tiny-gradient elements by up to lr: compare the updates as a whole.
    start = _model(tiny_smollm_dir, torch.float32)
    for (name, a), b, w0 in zip(ref.named_parameters(), fused_model.parameters(), start.parameters()):
        moved = (a - w0).norm()
        assert (b - a).norm() <= 0.05 * moved + 1e-6, name


@pytest.mark.parametrize("method, bits", [("galore", 4), ("qlora", 4), ("qlora", 8)])
def test_trial_takes_the_fast_path_on_gpu(tiny_smollm_dir, unified_data, tmp_path, method, bits):
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.trial import run_trial

    train, test = unified_data
    cfg = load_config(TrialConfig, None, [
        f"method={method}", f"model={tiny_smollm_dir}", f"data.train={train}", f"data.test={test}",
        f"output_dir={tmp_path / 'trial'}", "max_seq_len=64", "batch_size=2", "max_steps=12", "logging_steps=2",
        "eval.num_examples=4", "eval.max_new_tokens=8", "eval.loss_examples=8", "scaling.num_workers=0",
        "galore.rank=8", "galore.update_proj_gap=5", f"qlora.bits={bits}", "interim_eval_examples=0",
    ])  # fmt: skip
    m = run_trial(cfg)
    # 12 steps: one eager warm-up step, then graph replays, except GaLore's refreshes (steps 0, 5 and 10),
    # which run eagerly (the first is also the warm-up); 200-step runs on an H100 replayed 199 of 200
    replays = 12 - 1 - (2 if method == "galore" else 0)
    assert m["fast_path"] == f"on: {replays} of 12 steps replayed as a CUDA graph" and m["step"] == 12
    losses = [loss for _, loss in m["train_loss_curve"]]
    assert len(losses) == 6 and all(loss == loss for loss in losses)
    assert m["trained_tokens"] > 0 and m["tokens_per_second"] > 0
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # see use_attention_kernels_without_plans


def _library_int8(a, CB, SCB):
    """bitsandbytes' MatMul8bitLt of ``a`` with a frozen int8 weight (threshold 6.0, training)."""
    from bitsandbytes.autograd._functions import MatMul8bitLt, MatmulLtState

    state = MatmulLtState()
    state.has_fp16_weights, state.is_training, state.threshold, state.CB, state.SCB = False, True, 6.0, CB, SCB
    return MatMul8bitLt.apply(a, torch.empty_like(CB), None, None, state)


def test_static_int8_matmul_matches_bitsandbytes_on_cuda():
    """The static LLM.int8 matmul gives bitsandbytes' MatMul8bitLt results on CUDA, outliers included."""
    from duetto.trainers.int8_static import StaticMatMul8bitLt

    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(96, 128, device="cuda", generator=g) * 0.05
    CB, SCB, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(W.half(), 0.0)
    A = torch.randn(2, 64, 128, device="cuda", generator=g)
    A[0, 3, 5], A[1, 7, 40] = 9.0, -8.0
    A = A.to(torch.bfloat16)
    grad = torch.randn(2, 64, 96, device="cuda", generator=g).to(torch.bfloat16)
    outs = []
    for static in (False, True):
        a = A.clone().requires_grad_(True)
        if static:
            out = StaticMatMul8bitLt.apply(a, CB, SCB, None, 6.0)
        else:
            out = _library_int8(a, CB, SCB)
        out.backward(grad)
        outs.append((out.detach().float(), a.grad.float()))
    (lib_out, lib_grad), (ours_out, ours_grad) = outs
    torch.testing.assert_close(ours_out, lib_out, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours_grad, lib_grad, rtol=0, atol=0)


def test_int8_qlora_step_replays_as_the_eager_step(tiny_smollm_dir):
    """A QLoRA step on an LLM.int8 base, captured with the static int8 matmul, gives the losses and
    adapter weights of the same steps run eagerly through bitsandbytes' own matmul."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from duetto.trainers.graph_step import GraphedStep, prepare_for_graphs

    def build():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(tiny_smollm_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                 dtype=torch.bfloat16, device_map={"": 0})  # fmt: skip
        m.config.use_cache = False
        torch.manual_seed(1)
        peft = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        return peft.train()  # as the Trainer's step leaves it: the int8 layers train

    eager, graphed = build(), build()
    largest = []
    for m in (eager, graphed):  # a few large channels into q/v: the outlier columns are in play
        for layer in m.base_model.model.model.layers:
            layer.input_layernorm.weight.data[:3] = 30.0
    eager.base_model.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: largest.append(args[0].abs().max().item()))
    assert prepare_for_graphs(graphed) is None
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=True) for m in (eager, graphed)]
    step = GraphedStep(graphed, autocast_bf16=False, warmup_steps=1)
    losses_e, losses_g = [], []
    for x in _batches(eager.config.vocab_size, 6):
        batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
        loss = eager(**batch).loss
        loss.backward()
        losses_e.append(loss.item())
        losses_g.append(step(batch).item())
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert step.graph is not None and step.replays >= 4 and step.failed is None
    assert max(largest) >= 6.0
    torch.testing.assert_close(torch.tensor(losses_g), torch.tensor(losses_e), rtol=2e-2, atol=2e-2)


def test_static_int8_matmul_replays_with_outliers_in_other_columns():
    """One captured forward and backward of the static int8 matmul, replayed on inputs whose outliers
    sit in other columns each time, gives bitsandbytes' eager results for each."""
    from duetto.trainers.int8_static import StaticMatMul8bitLt

    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(64, 128, device="cuda", generator=g) * 0.05
    CB, SCB, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(W.half(), 0.0)
    x = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as capture requires
        StaticMatMul8bitLt.apply(x, CB, SCB, None, 6.0).backward(grad)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = StaticMatMul8bitLt.apply(x, CB, SCB, None, 6.0)
        out.backward(grad)
    for cols in ([3], [50, 51, 90], []):
        fresh = torch.randn(32, 128, device="cuda", generator=g).to(torch.bfloat16)
        for c in cols:
            fresh[c % 32, c] = 8.0
        with torch.no_grad():
            x.copy_(fresh)
        graph.replay()
        ref_x = fresh.clone().requires_grad_(True)
        ref = _library_int8(ref_x, CB, SCB)
        ref.backward(grad)
        torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(x.grad.float(), ref_x.grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_steps_replay_as_the_eager_packed_steps(tiny_smollm_dir, unified_data, tmp_path, bits):
    """Two QLoRA trials (ranks, alphas, learning rates and seeds of their own) packed on one base: with
    the pack's forward and backward replayed as a CUDA graph they follow the loss curves and end with
    the eval losses of the same pack stepped eagerly (cuda_graphs: false)."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import train_packed

    train, test = unified_data
    common = [f"model={tiny_smollm_dir}", f"data.train={train}", f"data.test={test}", "method=qlora", "max_seq_len=64",
              "batch_size=2", "max_steps=8", "logging_steps=1", "report_every_steps=0", "interim_eval_examples=0",
              "eval.num_examples=2", "eval.max_new_tokens=4", "eval.loss_examples=8", "qlora.dropout=0.0",
              f"qlora.bits={bits}"]  # fmt: skip
    variants = [["seed=1", "learning_rate=3e-3", "qlora.r=8", "qlora.alpha=16"],
                ["seed=7", "learning_rate=1e-3", "qlora.r=4", "qlora.alpha=32"]]
    runs = {}
    for graphs in ("true", "false"):
        cfgs = [load_config(TrialConfig, None, common + v + [f"cuda_graphs={graphs}", f"output_dir={tmp_path / graphs / str(i)}"])
                for i, v in enumerate(variants)]  # fmt: skip
        runs[graphs] = train_packed(cfgs, torch.device("cuda"))
    for fast, plain in zip(runs["true"], runs["false"]):
        # the first step warms up, the second is captured and replayed, the rest replay
        assert fast["fast_path"].endswith("; 7 of 8 steps replayed as a CUDA graph"), fast["fast_path"]
        assert plain["fast_path"] == "packed: 2 trials on one base when it left"
        ours = [loss for _, loss in fast["train_loss_curve"]]
        theirs = [loss for _, loss in plain["train_loss_curve"]]
        assert ours == pytest.approx(theirs, rel=2e-2)
        assert fast["eval_loss"] == pytest.approx(plain["eval_loss"], rel=2e-2)


def _packed_trials_follow_each_alone(model_dir, unified_data, tmp_path, settings, variants):
    """Two trials of ``settings`` (each with its ``variants``) packed on the GPU, their forward and backward
    replayed as one CUDA graph: each follows the loss curve and ends at the eval loss of `duetto train`
    of it alone on the GPU fast path (bf16 noise apart)."""
    from duetto.config import load_config
    from duetto.trainers.config import TrialConfig
    from duetto.trainers.packed_run import train_packed
    from duetto.trainers.trial import run_trial

    train, test = unified_data
    common = [f"model={model_dir}", f"data.train={train}", f"data.test={test}", "max_seq_len=64", "batch_size=2",
              "max_steps=8", "logging_steps=1", "report_every_steps=0", "interim_eval_examples=0", "eval.num_examples=2",
              "eval.max_new_tokens=4", "eval.loss_examples=8", "scaling.num_workers=0", *settings]  # fmt: skip
    cfgs = lambda tag: [load_config(TrialConfig, None, common + v + [f"output_dir={tmp_path / tag / str(i)}"])
                        for i, v in enumerate(variants)]  # fmt: skip
    alone = [run_trial(c) for c in cfgs("alone")]
    packed = train_packed(cfgs("packed"), torch.device("cuda"))
    for mine, solo in zip(packed, alone):
        assert mine["fast_path"].endswith("; 7 of 8 steps replayed as a CUDA graph"), mine["fast_path"]
        ours = [loss for _, loss in mine["train_loss_curve"]]
        theirs = [loss for _, loss in solo["train_loss_curve"]]
        assert ours == pytest.approx(theirs, rel=2e-2)
        assert mine["eval_loss"] == pytest.approx(solo["eval_loss"], rel=2e-2)


def test_stacked_galore_trials_on_graphs_follow_each_trial_alone(tiny_smollm_dir, unified_data, tmp_path):
    """Two GaLore trials (seeds, learning rates, ranks, gaps of their own; one layer-wise) on stacked
    weights follow each trial alone (_packed_trials_follow_each_alone)."""
    _packed_trials_follow_each_alone(
        tiny_smollm_dir, unified_data, tmp_path, ["method=galore", "galore.update_proj_gap=4"],
        [["seed=1", "learning_rate=3e-3", "galore.rank=8", "galore.layerwise=true"],
         ["seed=7", "learning_rate=1e-3", "galore.rank=4", "galore.layerwise=false"]],
    )  # fmt: skip


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_qlora_trials_on_graphs_follow_each_trial_alone(tiny_smollm_dir, unified_data, tmp_path, bits):
    """Two QLoRA trials (seeds, learning rates, ranks, alphas of their own) packed on one base, under the
    bf16 autocast a trial alone trains under, follow each trial alone (_packed_trials_follow_each_alone)."""
    _packed_trials_follow_each_alone(
        tiny_smollm_dir, unified_data, tmp_path, ["method=qlora", "qlora.dropout=0.0", f"qlora.bits={bits}"],
        [["seed=1", "learning_rate=3e-3", "qlora.r=8", "qlora.alpha=16"],
         ["seed=7", "learning_rate=1e-3", "qlora.r=4", "qlora.alpha=32"]],
    )  # fmt: skip
