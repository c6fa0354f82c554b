"""LoFT-AdamW against independent references: the paper's defining sums, and torch.optim.AdamW at full rank."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from loft_peft import LoftConfig, create_loft_optimizer
from loft_peft.optim import loft_factor_pairs


def _nonlinear_loss(weight: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """f(W): a smooth, non-quadratic loss of a linear layer's output, so moments change direction over steps."""
    return (nn.functional.softplus(inputs @ weight.T) * targets).sum() / inputs.shape[0] + 0.1 * weight.pow(4).sum()


def _single_layer_loft(out_features, in_features, rank, *, zero_base=False, seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(in_features, out_features, bias=False))
    if zero_base:
        nn.init.zeros_(base.proj.weight)
    model = get_peft_model(base.double(), LoftConfig(r=rank, target_modules=["proj"], init_weights=False))
    model.double()
    layer = model.base_model.model.proj
    return model, layer


class DefinitionOracle:
    """LoFT-AdamW written straight from eqs. (8)-(9) and (13): no recursion, no calibration matrices, no cross terms.

    It keeps every past full gradient and every past factor. At step k the U-branch moments are the sums
    ``m~ = (1-b1) sum_i b1^(k-i) g_i^V`` and ``v~ = (1-b2) sum_i b2^(k-i) g_i^V ⊙ g_i^V`` of the sequentially projected
    gradients ``g_i^V = g_i P_{V_i} P_{V_{i+1}} ... P_{V_k}`` (and mirrored for V, projecting from the left with U).
    The moving factor then takes the projected Adam step ``-lr D V (V^T V)^-1``. Projections use ``Y Y^+`` with the
    SVD-based ``torch.linalg.pinv`` of the factor itself.
    """

    def __init__(self, w0, u, v, *, lr, betas, eps, weight_decay):
        self.w0, self.u, self.v = w0.clone(), u.clone(), v.clone()
        self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.grads, self.us, self.vs = [], [], []
        self.move_u = True

    def weight(self):
        return self.w0 + self.u @ self.v.T

    @staticmethod
    def _projector(factor):
        return factor @ torch.linalg.pinv(factor)

    def _moments(self, branch):
        k = len(self.grads)
        first = torch.zeros_like(self.grads[0] if branch == "u" else self.grads[0].T)
        second = torch.zeros_like(first)
        for i, grad in enumerate(self.grads):
            if branch == "u":  # g_i P_{V_i} ... P_{V_k}
                projected = grad
                for v in self.vs[i:]:
                    projected = projected @ self._projector(v)
            else:  # (P_{U_k} ... P_{U_i} g_i)^T
                projected = grad
                for u in self.us[i:]:
                    projected = self._projector(u) @ projected
                projected = projected.T
            first += (1 - self.beta1) * self.beta1 ** (k - 1 - i) * projected
            second += (1 - self.beta2) * self.beta2 ** (k - 1 - i) * projected * projected
        return first, second

    def step(self, grad):
        self.grads.append(grad.clone())
        self.us.append(self.u.clone())
        self.vs.append(self.v.clone())
        k = len(self.grads)
        bc1, bc2 = 1 - self.beta1**k, 1 - self.beta2**k
        decay = 1 - self.lr * self.weight_decay
        if self.move_u:
            first, second = self._moments("u")
            update = (first / bc1) / (second.sqrt() / bc2**0.5 + self.eps)
            self.u = decay * self.u - self.lr * update @ torch.linalg.pinv(self.v).T
        else:
            first, second = self._moments("v")
            update = (first / bc1) / (second.sqrt() / bc2**0.5 + self.eps)
            self.v = decay * self.v - self.lr * update @ torch.linalg.pinv(self.u).T
        self.move_u = not self.move_u


def _relative_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_loft_adamw_equals_definition_oracle(weight_decay):
    torch.manual_seed(1)
    model, layer = _single_layer_loft(12, 9, 3)
    inputs, targets = torch.randn(20, 9, dtype=torch.float64), torch.rand(20, 12, dtype=torch.float64)
    lr, betas, eps = 2e-2, (0.9, 0.99), 1e-8
    optimizer = create_loft_optimizer(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    b_param, a_param = layer.loft_B["default"], layer.loft_A["default"]
    w0 = layer.base_layer.weight.detach()
    oracle = DefinitionOracle(
        w0, b_param.detach(), a_param.detach().T, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay
    )
    worst = 0.0
    for _ in range(25):
        x = inputs
        loss = (nn.functional.softplus(model(x)) * targets).sum() / x.shape[0] + 0.1 * (
            w0 + b_param @ a_param
        ).pow(4).sum()
        loss.backward()
        weight = oracle.weight().requires_grad_(True)
        (grad,) = torch.autograd.grad(_nonlinear_loss(weight, inputs, targets), weight)
        oracle.step(grad)
        optimizer.step()
        optimizer.zero_grad()
        worst = max(worst, _relative_error(b_param.detach(), oracle.u), _relative_error(a_param.detach().T, oracle.v))
    print(f"definition oracle: worst relative error {worst:.2e}")
    assert worst < 1e-7, f"LoFT-AdamW departs from the definition by {worst:.2e} (relative)"
    # The run actually moved both factors a long way from where they started.
    assert not torch.allclose(oracle.u, oracle.us[0]) and not torch.allclose(oracle.v, oracle.vs[0])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_full_rank_loft_equals_torch_adamw(weight_decay):
    size = 6
    model, layer = _single_layer_loft(size, size, size, zero_base=True, seed=3)
    b_param, a_param = layer.loft_B["default"], layer.loft_A["default"]
    torch.manual_seed(4)
    inputs, targets = torch.randn(16, size, dtype=torch.float64), torch.rand(16, size, dtype=torch.float64)
    weight = nn.Parameter((b_param @ a_param).detach().clone())
    start = weight.detach().clone()
    reference = torch.optim.AdamW([weight], lr=1e-2, weight_decay=weight_decay)
    optimizer = create_loft_optimizer(model, lr=1e-2, weight_decay=weight_decay)
    for step in range(30):
        _nonlinear_loss(b_param @ a_param, inputs, targets).backward()
        _nonlinear_loss(weight, inputs, targets).backward()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()
        difference = float((b_param @ a_param - weight).detach().abs().max())
        assert difference < 1e-6, f"step {step}: full-rank LoFT differs from AdamW by {difference:.2e}"
    assert float((weight.detach() - start).abs().max()) > 0.1, "the comparison must cover a real trajectory"


def test_full_rank_loft_simple_is_not_adamw():
    """The simple variant skips the full-space rebuild, so it is *not* AdamW at full rank: the reference can tell."""
    size = 6
    model, layer = _single_layer_loft(size, size, size, zero_base=True, seed=3)
    b_param, a_param = layer.loft_B["default"], layer.loft_A["default"]
    torch.manual_seed(4)
    inputs, targets = torch.randn(16, size, dtype=torch.float64), torch.rand(16, size, dtype=torch.float64)
    weight = nn.Parameter((b_param @ a_param).detach().clone())
    reference = torch.optim.AdamW([weight], lr=1e-2)
    optimizer = create_loft_optimizer(model, lr=1e-2, variant="simple")
    for _ in range(5):
        _nonlinear_loss(b_param @ a_param, inputs, targets).backward()
        _nonlinear_loss(weight, inputs, targets).backward()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()
    assert float((b_param @ a_param - weight).detach().abs().max()) > 1e-4


def test_plain_parameters_get_exact_adamw(toy_model):
    """Biases and heads outside the LoFT pairs are stepped exactly as torch.optim.AdamW steps them."""
    model = get_peft_model(toy_model.double(), LoftConfig(r=2, target_modules=["proj"], modules_to_save=["head"]))
    head = model.base_model.model.head.modules_to_save["default"]
    twin = nn.Linear(12, 5).double()
    twin.load_state_dict(head.state_dict())
    reference = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    optimizer = create_loft_optimizer(model, lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    x = torch.randn(8, 9, dtype=torch.float64)
    for _ in range(10):
        hidden = model.base_model.model.act(model.base_model.model.proj(x)).detach()
        (head(hidden) ** 2).sum().backward()
        (twin(hidden) ** 2).sum().backward()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
        reference.zero_grad()
    torch.testing.assert_close(head.weight, twin.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.bias, twin.bias, rtol=1e-12, atol=1e-12)


def test_first_step_moves_b_and_a_scaled_gradient_is_exactly_zero(toy_model):
    model = get_peft_model(toy_model, LoftConfig(r=3, target_modules=["proj"]))
    layer = model.base_model.model.proj
    a_before = layer.loft_A["default"].detach().clone()
    optimizer = create_loft_optimizer(model, lr=1e-2)
    model(torch.randn(4, 9)).sum().backward()
    assert optimizer.moving_factor() == "B"
    optimizer.step()
    assert torch.equal(layer.loft_A["default"], a_before)
    assert layer.loft_B["default"].abs().sum() > 0
    state_a = optimizer.state[layer.loft_A["default"]]
    # B was zero when A's gradient was scaled by (B^T B)^+: the scaled gradient, hence A's moment, is exactly 0.
    assert torch.equal(state_a["exp_avg"], torch.zeros_like(state_a["exp_avg"]))
    assert torch.isfinite(state_a["cross_sq"]).all()
    assert optimizer.moving_factor() == "A"


def test_pairs_come_from_active_adapters_only(toy_model):
    model = get_peft_model(toy_model, LoftConfig(r=2, target_modules=["proj", "head"]))
    model.add_adapter("other", LoftConfig(r=3, target_modules=["proj"]))
    pairs = loft_factor_pairs(model)
    assert [tuple(b.shape) for b, _ in pairs] == [(12, 2), (5, 2)]
    model.set_adapter("other")
    assert [tuple(b.shape) for b, _ in loft_factor_pairs(model)] == [(12, 3)]


def test_the_maths_functions_on_a_batch_of_layers_equal_them_layer_by_layer():
    from loft_peft.optim import maths

    generator = torch.Generator().manual_seed(0)
    layers, k, l, r = 3, 11, 7, 4
    x, y, y_prev = (torch.randn(layers, n, r, generator=generator, dtype=torch.float64) for n in (k, l, l))
    grad = torch.randn(layers, k, r, generator=generator, dtype=torch.float64)
    cross = maths.packed_outer(torch.randn(layers, k, r, generator=generator, dtype=torch.float64))
    pinv = maths.gram_pinv(y)
    calibration = maths.calibration_matrix(y_prev, y, pinv)
    batched = {
        "gram_pinv": pinv,
        "calibration": calibration,
        "packed_outer": maths.packed_outer(x),
        "packed_congruence": maths.packed_congruence(calibration),
        "packed_khatri_rao": maths.packed_khatri_rao(y),
        "first_moment": maths.update_first_moment(x, calibration, grad, 0.9),
        "cross_terms": maths.update_cross_terms(cross, maths.packed_congruence(calibration), grad, 0.999),
        "adam": maths.projected_adam_direction(x, cross, y, pinv, bias_correction1=0.1, bias_correction2=0.01,
                                               eps=1e-8, floor=0.01, block_elements=3 * l),
        "muon": maths.projected_muon_direction(x, y),
    }
    for i in range(layers):
        single = {
            "gram_pinv": maths.gram_pinv(y[i]),
            "calibration": maths.calibration_matrix(y_prev[i], y[i], pinv[i]),
            "packed_outer": maths.packed_outer(x[i]),
            "packed_congruence": maths.packed_congruence(calibration[i]),
            "packed_khatri_rao": maths.packed_khatri_rao(y[i]),
            "first_moment": maths.update_first_moment(x[i], calibration[i], grad[i], 0.9),
            "cross_terms": maths.update_cross_terms(cross[i], maths.packed_congruence(calibration[i]), grad[i],
                                                    0.999),
            "adam": maths.projected_adam_direction(x[i], cross[i], y[i], pinv[i], bias_correction1=0.1,
                                                   bias_correction2=0.01, eps=1e-8, floor=0.01, block_elements=3 * l),
            "muon": maths.projected_muon_direction(x[i], y[i]),
        }
        for name, value in single.items():
            torch.testing.assert_close(batched[name][i], value, rtol=1e-12, atol=1e-12, msg=name)
    assert float(maths.effective_grad_sq_norm(grad, pinv)) == pytest.approx(
        sum(float(maths.effective_grad_sq_norm(grad[i], pinv[i])) for i in range(layers)), rel=1e-12)
