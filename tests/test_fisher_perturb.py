"""The batched per-sample Fisher against a loop of single-sample autograd gradients; the perturbation hook."""

import pytest
import torch
from torch import nn

from pmserve.adapters import LoraSpec, add_lora, lora_layers, task_vectors
from pmserve.fisher import diagonal_fisher
from pmserve.perturb import Perturbation, draw_scales


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.key = nn.Linear(6, 5)
        self.mid = nn.Linear(5, 5)
        self.value = nn.Linear(5, 4)

    def forward(self, x):
        return self.value(torch.tanh(self.mid(torch.tanh(self.key(x))))).mean(1)


def make_peft(seed=0):
    torch.manual_seed(seed)
    model = add_lora(Toy(), LoraSpec(rank=2, alpha=4.0, target_modules=("key", "value")))
    for m in lora_layers(model).values():  # a non-zero B so the branch matters
        nn.init.normal_(m.lora_B["default"].weight)
    return model


def test_fisher_equals_per_sample_autograd():
    model = make_peft()
    layers = lora_layers(model)
    x = torch.randn(19, 3, 6)
    y = torch.randint(0, 4, (19,))

    def loss_fn(batch, ys):
        return nn.functional.cross_entropy(model(batch["x"]), ys, reduction="sum")

    # batches of 11 and 8: the per-sample products go SAMPLES_PER_PRODUCT (8) at a time, a part left over in one
    fisher = diagonal_fisher(layers, [({"x": x[:11]}, y[:11]), ({"x": x[11:]}, y[11:])], loss_fn)

    # reference: effective weights W + scaling B A as explicit leaves, one sample at a time
    ref = {k: torch.zeros_like(m.base_layer.weight) for k, m in layers.items()}
    deltas = task_vectors(model)
    for n in range(19):
        ws = {k: (m.base_layer.weight + deltas[k]).detach().requires_grad_() for k, m in layers.items()}
        h = torch.tanh(nn.functional.linear(x[n : n + 1], ws["key"], layers["key"].base_layer.bias))
        h = torch.tanh(model.base_model.model.mid(h))
        out = nn.functional.linear(h, ws["value"], layers["value"].base_layer.bias).mean(1)
        grads = torch.autograd.grad(nn.functional.cross_entropy(out, y[n : n + 1]), list(ws.values()))
        for k, g in zip(ws, grads):
            ref[k] += g**2 / 19
    for k in ref:
        torch.testing.assert_close(fisher[k], ref[k], rtol=1e-4, atol=1e-7)


def _reference(model, layers, x, ws):
    h = torch.tanh(nn.functional.linear(x, ws["key"], layers["key"].base_layer.bias))
    h = torch.tanh(model.base_model.model.mid(h))
    return nn.functional.linear(h, ws["value"], layers["value"].base_layer.bias).mean(1)


@pytest.mark.parametrize("per", ["step", "sample"])
def test_perturbation_scales_the_lora_branch_only(per):
    """Outputs and LoRA B gradients equal plain autograd on W + s * Delta, sample by sample; off() restores."""
    model = make_peft(1)
    layers = lora_layers(model)
    x = torch.randn(4, 3, 6)
    plain, deltas = model(x).detach(), task_vectors(model)  # Delta = scaling * B A, scaling = 4 / 2
    pert = Perturbation(layers, eps=0.5, per=per, seed=0)
    drawn = set()
    for _ in range(4):
        s = pert.draw(4).expand(4).tolist()
        drawn.update(s)
        y = model(x)
        grads = torch.autograd.grad(y.pow(2).sum(), [m.lora_B["default"].weight for m in layers.values()])
        want = [torch.zeros_like(g) for g in grads]
        for n in range(4):
            ws = {
                k: (m.base_layer.weight + s[n] * deltas[k]).detach().requires_grad_()
                for k, m in layers.items()
            }
            out = _reference(model, layers, x[n : n + 1], ws)
            torch.testing.assert_close(y[n : n + 1], out)
            # W = W_0 + s * 2 * B A, so dL/dB = s * 2 * dL/dW @ A^T
            for j, (m, g) in enumerate(
                zip(layers.values(), torch.autograd.grad(out.pow(2).sum(), list(ws.values())))
            ):
                want[j] += s[n] * 2.0 * g @ m.lora_A["default"].weight.T
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w)
    assert len(drawn) > 1
    pert.off()
    torch.testing.assert_close(model(x), plain)
    pert.remove()
    assert all(m.scaling["default"] == 2.0 for m in layers.values())


def test_draw_frequencies_and_values():
    s = draw_scales(30000, 0.5, torch.Generator().manual_seed(0))
    values, counts = torch.unique(s, return_counts=True)
    assert values.tolist() == [0.5, 1.0, 1.5]
    assert all(abs(c / 30000 - 1 / 3) < 0.015 for c in counts.tolist())
    with pytest.raises(ValueError, match="eps"):
        Perturbation([], eps=1.0)


def test_sampled_label_fisher_converges_to_the_true_fisher():
    """task_fisher's label draws (argmax p / q, q ~ Exp(1)) against the analytic sum_y p_y g_y^2 of each sample;
    the empirical Fisher (true labels) is far from it, so the comparison can tell them apart."""
    from pmserve.task_fisher import task_fisher
    from pmserve.tasks import Split

    model = make_peft(2)
    layers = lora_layers(model)
    x = torch.randn(3, 3, 6) * 2
    split = Split(inputs=[0, 1, 2], labels=["a", "b", "c"])
    classes = ["a", "b", "c", "d"]
    order = torch.arange(3).repeat(2000)  # each sample 2000 times, each time its own draw

    def run(sample_labels):
        return task_fisher(
            lambda x: model(x),
            lambda idx: {"x": x[idx]},
            layers,
            split,
            classes,
            lambda logits: logits,
            order,
            500,
            torch.device("cpu"),
            sample_labels=sample_labels,
        )

    sampled = run(torch.Generator().manual_seed(0))
    empirical = run(None)
    # reference: per sample and class, autograd on explicit full weights W + Delta, weighted by the model's p_y
    deltas = task_vectors(model)
    ws = {k: (m.base_layer.weight + deltas[k]).detach().requires_grad_() for k, m in layers.items()}
    true = {k: torch.zeros_like(w) for k, w in ws.items()}
    for n in range(3):
        out = _reference(model, layers, x[n : n + 1], ws)
        p = torch.softmax(out.detach(), -1)[0]
        for y in range(4):
            loss = nn.functional.cross_entropy(out, torch.tensor([y]))
            for k, g in zip(ws, torch.autograd.grad(loss, list(ws.values()), retain_graph=True)):
                true[k] += p[y] * g.pow(2) / 3
    for k in true:
        assert (sampled[k] - true[k]).norm() / true[k].norm() < 0.05, k
        assert (empirical[k] - true[k]).norm() / true[k].norm() > 0.2, k
