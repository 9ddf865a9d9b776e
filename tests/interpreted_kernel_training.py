"""FusedPerturbation: PEFT LoRA layers routed through the fused kernel (Triton interpreter) against
PEFT's own path with every layer's scaling multiplied by the kernel's s.

Not collected by a plain `pytest tests`: tests/test_kernel_training.py runs this file in a child pytest whose
environment alone has TRITON_INTERPRET=1 (by hand: TRITON_INTERPRET=1 python -m pytest
tests/interpreted_kernel_training.py)."""

from tests.interpreter_subprocess import require_interpreter

require_interpreter(__name__)  # before anything imports triton or pmserve.kernels.fused_lora

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed")
pytest.importorskip("peft", reason="PEFT is not installed")

from pmserve.kernels import fused_lora as _fl  # noqa: E402
from pmserve.kernels import perturbation_scales  # noqa: E402

from pmserve import kernels, perturb  # noqa: E402
from pmserve.adapters import ADAPTER, LoraSpec, add_lora, lora_layers  # noqa: E402
from pmserve.errors import PMError  # noqa: E402
from pmserve.perturb import FusedPerturbation, step_seed, use_fused_kernel  # noqa: E402

if not _fl._INTERPRET:  # never a silent skip: the parent test reports this child's failure
    raise RuntimeError(
        "pmserve.kernels.fused_lora was imported before TRITON_INTERPRET=1 was set; "
        "run this file through tests/test_kernel*.py"
    )

EPS = 0.5


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.key = nn.Linear(16, 24)
        self.value = nn.Linear(24, 16, bias=False)

    def forward(self, x):
        return self.value(torch.tanh(self.key(x)))


def _randomise_b(peft_model, seed=0):
    """PEFT starts B at 0; give it values so every gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            w = layer.lora_B[ADAPTER].weight
            w.copy_(torch.randn(w.shape, generator=g) / 2)


def _tiny(dtype=torch.float32, **spec):
    torch.manual_seed(0)
    model = add_lora(
        Tiny().to(dtype), LoraSpec(**{"rank": 4, "alpha": 8.0, "target_modules": ("key", "value"), **spec})
    )
    _randomise_b(model)
    return model


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = add_lora(BertModel(cfg), LoraSpec(rank=4, alpha=8.0, target_modules=("key", "value")))
    _randomise_b(model, 1)
    return model


def _grads(model, out, dy, x=None):
    """Backward of <out, dy>; returns (out, dx, {param name: grad}) and clears the grads."""
    out.backward(dy)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    dx = None
    if x is not None:
        dx, x.grad = x.grad, None
    return out.detach(), dx, grads


def _close(a, b, what, rtol=1e-4, atol=1e-5):
    """atol is relative to b's largest magnitude (low-precision sums cancel)."""
    atol = atol * max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _close_all(got, ref, rtol=1e-4, atol=1e-5):
    _close(got[0], ref[0], "output", rtol, atol)
    if ref[1] is not None:
        _close(got[1], ref[1], "input grad", rtol, atol)
    assert got[2].keys() == ref[2].keys() and len(ref[2]) >= 4  # lora_A, lora_B of every key and value
    assert all(".lora_A." in n or ".lora_B." in n for n in ref[2])
    for n in ref[2]:
        _close(got[2][n], ref[2][n], n, rtol, atol)


def _set_scaling(model, factor):
    for layer in lora_layers(model).values():
        layer.scaling[ADAPTER] = 2.0 * factor  # alpha / rank = 2


def _data(shape=(3, 5, 16), out=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape[:-1], out, generator=g)


def _run_tiny(model, x, dy):
    xx = x.clone().requires_grad_()
    return _grads(model, model(xx), dy, xx)


def test_eps_zero_matches_peft_and_remove_restores():
    model = _tiny()
    layers = lora_layers(model)
    x, dy = _data()
    plain = _run_tiny(model, x, dy)

    pert = FusedPerturbation(layers, 0.0)
    assert all("forward" in layer.__dict__ for layer in layers.values())
    assert pert.draw(3, "cpu") is None
    _close_all(_run_tiny(model, x, dy), plain)

    pert.remove()
    assert not any("forward" in layer.__dict__ for layer in layers.values())
    again = _run_tiny(model, x, dy)  # PEFT's own forward again: bit-identical
    assert torch.equal(again[0], plain[0]) and torch.equal(again[1], plain[1])
    assert all(torch.equal(again[2][n], plain[2][n]) for n in plain[2])


def test_per_step_matches_scaled_peft():
    model = _tiny()
    ref_model = copy.deepcopy(model)
    x, dy = _data()
    pert = FusedPerturbation(lora_layers(model), EPS, "step", seed=3)
    # Before the first draw and after off(): plain LoRA.
    _close_all(_run_tiny(model, x, dy), _run_tiny(ref_model, x, dy))
    seen = set()
    for step in range(4):
        s = pert.draw(3, "cpu")
        assert pert.step_seed == step_seed(3, step) and pert.step == step + 1
        assert s.shape == (1,)
        assert torch.equal(s, perturbation_scales(step_seed(3, step), 1, EPS, device="cpu"))
        seen.add(s.item())
        _set_scaling(ref_model, s.item())
        _close_all(_run_tiny(model, x, dy), _run_tiny(ref_model, x, dy))
    assert len(seen) > 1  # the draws do change from step to step
    pert.off()
    _set_scaling(ref_model, 1.0)
    _close_all(_run_tiny(model, x, dy), _run_tiny(ref_model, x, dy))
    pert.remove()
    # Same seed, same sequence of draws.
    again = FusedPerturbation(lora_layers(model), EPS, "step", seed=3)
    assert [again.draw(3, "cpu").item() for _ in range(4)] == [
        perturbation_scales(step_seed(3, k), 1, EPS, device="cpu").item() for k in range(4)
    ]
    again.remove()


def test_per_sample_matches_scaled_peft_on_bert():
    model = _tiny_bert()
    ref_model = copy.deepcopy(model)
    ids = torch.tensor([[2, 7, 9, 4, 3], [2, 11, 5, 3, 0], [2, 8, 6, 13, 3]])
    mask = (ids != 0).long()
    dy = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1))
    pert = FusedPerturbation(lora_layers(model), EPS, "sample", seed=5)
    draws = set()
    for step in range(2):
        s = pert.draw(3, "cpu")
        assert s.shape == (3,)
        assert torch.equal(s, perturbation_scales(step_seed(5, step), 3, EPS, per_row=True, device="cpu"))
        draws.update(s.tolist())
        got = _grads(model, model(input_ids=ids, attention_mask=mask).last_hidden_state, dy)
        # Reference: each sample alone through PEFT with scaling * s_b; the gradients add up.
        outs, grads = [], {}
        for b in range(3):
            _set_scaling(ref_model, s[b].item())
            out = ref_model(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).last_hidden_state
            o, _, g = _grads(ref_model, out, dy[b : b + 1])
            outs.append(o)
            for n, v in g.items():
                grads[n] = grads.get(n, 0) + v
        _close_all(got, (torch.cat(outs), None, grads))
    assert len(draws) > 1  # samples / steps really get different factors
    pert.remove()


def test_per_sample_needs_whole_samples():
    model = _tiny()
    x, _ = _data()
    pert = FusedPerturbation(lora_layers(model), EPS, "sample", seed=0)
    pert.draw(2, "cpu")  # 15 rows are not a whole number of rows for each of 2 samples
    with pytest.raises(RuntimeError, match="batch of 2"):
        model(x)
    pert.remove()


def test_autocast_and_low_precision_base():
    # bf16 base with PEFT's float32 adapters: the kernel runs in bf16, gradients reach the fp32 weights.
    model = _tiny(torch.bfloat16)
    assert lora_layers(model)["key"].lora_A[ADAPTER].weight.dtype == torch.float32
    x, dy = _data()
    x, dy = x.bfloat16(), dy.bfloat16()
    plain = _run_tiny(model, x, dy)
    pert = FusedPerturbation(lora_layers(model), 0.0)
    got = _run_tiny(model, x, dy)
    pert.remove()
    assert got[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got[2].values())
    _close_all(got, plain, rtol=4e-2, atol=2e-2)
    # float32 model under autocast: the kernel computes in the autocast dtype, like F.linear.
    model = _tiny()
    x, dy = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _run_tiny(model, x, dy.bfloat16())
        pert = FusedPerturbation(lora_layers(model), 0.0)
        got = _run_tiny(model, x, dy.bfloat16())
        pert.remove()
    assert got[0].dtype == plain[0].dtype == torch.bfloat16
    _close_all(got, plain, rtol=4e-2, atol=2e-2)


def test_disabled_adapter_runs_base_only():
    model = _tiny()
    x, _ = _data()
    pert = FusedPerturbation(lora_layers(model), EPS, seed=1)
    pert.draw(3, "cpu")
    with model.disable_adapter(), torch.no_grad():
        got = model(x)
    pert.remove()
    with model.disable_adapter(), torch.no_grad():
        assert torch.equal(got, model(x))


def test_unsupported_layers_and_bad_args():
    model = _tiny()
    with torch.no_grad():
        model.base_model.model.value.lora_dropout[ADAPTER] = nn.Dropout(0.1)
    layers = lora_layers(model)
    with pytest.raises(ValueError, match="^layers: .*value.*dropout"):
        FusedPerturbation(layers, EPS)
    with pytest.raises(PMError, match="^--kernel: triton cannot run LoRA layer value"):
        use_fused_kernel("triton", "cpu", layers)
    assert not any("forward" in layer.__dict__ for layer in layers.values())
    with pytest.raises(ValueError, match="eps"):
        FusedPerturbation(lora_layers(_tiny()), 1.0)
    with pytest.raises(ValueError, match="per"):
        FusedPerturbation(lora_layers(_tiny()), EPS, per="token")


def test_use_fused_kernel(monkeypatch):
    assert use_fused_kernel("torch", "cpu") is False
    assert use_fused_kernel("triton", "cpu") is True  # the interpreter runs anywhere
    assert use_fused_kernel("auto", "cpu") is False  # auto: CUDA only, never the interpreter
    assert use_fused_kernel("auto", torch.device("cuda")) is False  # interpreter: too slow to choose
    with pytest.raises(PMError, match="^--kernel: must be"):
        use_fused_kernel("cuda", "cpu")
    monkeypatch.setattr(kernels, "fused_lora_available", lambda device=None: False)
    with pytest.raises(PMError, match=r"^--kernel: triton needs a CUDA device \(or TRITON_INTERPRET=1\)$"):
        use_fused_kernel("triton", "cpu")
    assert use_fused_kernel("auto", "cuda") is False
    # auto chooses the kernel only where it was measured faster (AUTO_CHOOSES_FUSED), and then only on CUDA.
    monkeypatch.setattr(kernels, "fused_lora_available", lambda device=None: True)
    monkeypatch.setattr(kernels, "fused_lora_interpreted", lambda: False)  # as on a real GPU
    assert perturb.AUTO_CHOOSES_FUSED is False  # no GPU figures for the issue-39 kernel yet
    assert use_fused_kernel("auto", "cuda") is False
    monkeypatch.setattr(perturb, "AUTO_CHOOSES_FUSED", True)
    assert use_fused_kernel("auto", "cuda") is True
    assert use_fused_kernel("auto", "cpu") is False


def test_step_seed():
    seeds = [step_seed(7, k) for k in range(1000)]
    assert seeds == [step_seed(7, k) for k in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert step_seed(8, 0) != step_seed(7, 0)


def test_train_with_kernel_matches_torch_path(tiny_model, tiny_tasks, tmp_path):
    """`pmserve train --kernel triton` (interpreter) learns the same task vectors as the PyTorch path
    when nothing is perturbed (method merge: eps plays no part), and runs P&M end to end."""
    from safetensors.torch import load_file

    from pmserve.train import TrainConfig, train

    def run(name, **kw):
        cfg = TrainConfig(
            data=str(tiny_tasks),
            model=str(tiny_model),
            epochs=1,
            batch_size=8,
            rank=2,
            fisher_samples=8,
            seed=1,
            head="linear",
            ridge_dim=32,
            eval_heads=[],
            **kw,
        )
        out = tmp_path / name
        train(cfg, out, progress=False, log=lambda *a: None)
        return out

    torch_run, triton_run = (
        run("torch", method="merge", kernel="torch"),
        run("triton", method="merge", kernel="triton"),
    )
    for t in sorted((torch_run / "tasks").iterdir()):
        ref, got = (  # the LoRA factors, and so the task vectors
            load_file(str(t / "adapter_model.safetensors")),
            load_file(str(triton_run / "tasks" / t.name / "adapter_model.safetensors")),
        )
        assert ref.keys() == got.keys() and ref
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-5)
    pm = run("pm", method="pm", kernel="triton", eps=0.5)
    metrics = __import__("json").loads((pm / "metrics.json").read_text())
    assert len(metrics["alphas"]) == 3 and 0 < metrics["ACC"] <= 1
