"""Direct-alignment losses: values at initialisation, hand-derived values and gradients, the registry,
length normalisation, and the selective log-softmax against a plain full log-softmax."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_core.losses.direct_alignment import (
    DIRECT_ALIGNMENT_LOSSES,
    apo_down_loss,
    apo_zero_loss,
    cdpo_loss,
    dpo_loss,
    dpo_nll_loss,
    dpo_norm_loss,
    ipo_loss,
    kto_loss,
    log1mexp,
    orpo_loss,
    simpo_loss,
)
from rlhf_core.losses.language_model import IGNORE_INDEX, logits_sequence_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LN2 = math.log(2)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softplus(x: float) -> float:  # -log sigma(-x)
    return math.log1p(math.exp(x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> list[list[float]]:
    return [g.tolist() for g in torch.autograd.grad(loss.sum(), inputs)]


def approx(values: list[float]):
    return pytest.approx(values, rel=1e-12, abs=1e-12)


# Two pairs shared by the paired hand-derived tests, beta = 0.5:
#   pair 0: pi_c -4, pi_r -6, ref_c -5, ref_r -5 -> Delta_c = +1, Delta_r = -1, h = +2, beta h = +1
#   pair 1: pi_c -7, pi_r -5, ref_c -6, ref_r -6 -> Delta_c = -1, Delta_r = +1, h = -2, beta h = -1
def pairs():
    return t(-4.0, -7.0), t(-6.0, -5.0), t(-5.0, -6.0), t(-5.0, -6.0)


# ---------------------------------------------------------------- registry


def test_registry_names_references_and_defaults():
    assert set(DIRECT_ALIGNMENT_LOSSES) == {
        "dpo", "cdpo", "ipo", "dpo_norm", "simpo", "orpo", "kto", "apo_zero", "apo_down", "dpo_nll",
    }  # fmt: skip
    reference_free = {name for name, spec in DIRECT_ALIGNMENT_LOSSES.items() if not spec.needs_reference}
    assert reference_free == {"simpo", "orpo"}
    for name, spec in DIRECT_ALIGNMENT_LOSSES.items():
        # reference-free losses cannot depend on reference log-probs: they do not take any
        takes_reference = any(arg.startswith("reference_") for arg in spec.inputs)
        assert takes_reference == spec.needs_reference, name
        assert spec.paired == (name != "kto"), name
    hyper = {name: spec.hyperparameters for name, spec in DIRECT_ALIGNMENT_LOSSES.items()}
    assert hyper["dpo"] == hyper["apo_zero"] == hyper["apo_down"] == {"beta": 0.1}
    assert hyper["ipo"] == {"beta": 0.1, "average_log_probs": False}
    assert hyper["cdpo"] == {"beta": 0.1, "label_smoothing": 0.1}
    assert hyper["dpo_norm"] == {"beta": 2.0}
    assert hyper["simpo"] == {"beta": 2.0, "gamma_beta_ratio": 0.5}
    assert hyper["orpo"] == {"odds_ratio_weight": 0.1}
    assert hyper["kto"] == {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0}
    assert hyper["dpo_nll"] == {"beta": 0.1, "alpha": 1.0}
    assert DIRECT_ALIGNMENT_LOSSES["dpo_norm"].inputs == (
        "policy_chosen_logps",
        "policy_rejected_logps",
        "reference_chosen_logps",
        "reference_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
    )


def test_losses_that_need_a_reference_do_depend_on_it():
    """The registry flag is honest the other way too: moving the reference moves these losses."""
    inputs = _random_inputs(seed=1)
    for name, spec in DIRECT_ALIGNMENT_LOSSES.items():
        if not spec.needs_reference or not spec.paired:
            continue
        args = {arg: inputs[arg] for arg in spec.inputs}
        moved = {**args, "reference_chosen_logps": args["reference_chosen_logps"] + 0.7}
        assert not torch.allclose(spec.fn(**args).losses, spec.fn(**moved).losses), name


# ---------------------------------------------------------------- initialisation (pi_theta == pi_ref)


def test_values_at_initialisation():
    generator = torch.Generator().manual_seed(0)
    logp_c = -torch.rand(5, generator=generator, dtype=torch.float64) * 30
    logp_r = -torch.rand(5, generator=generator, dtype=torch.float64) * 30
    n_c, n_r = torch.tensor([3, 7, 1, 12, 5]), torch.tensor([4, 2, 9, 6, 5])
    same = (logp_c, logp_r, logp_c, logp_r)  # policy == reference: every Delta = 0, h = 0

    def full(value: float) -> torch.Tensor:
        return torch.full((5,), value, dtype=torch.float64)

    # -log sigma(0) = ln 2; cDPO: (1 - eps) ln 2 + eps ln 2 = ln 2
    assert torch.allclose(dpo_loss(*same).losses, full(LN2))
    assert torch.allclose(cdpo_loss(*same).losses, full(LN2))
    assert torch.allclose(dpo_norm_loss(*same, n_c, n_r).losses, full(LN2))
    # IPO: (0 - 1/(2 beta))^2 = 25 at beta 0.1, 1 at beta 0.5
    assert torch.allclose(ipo_loss(*same).losses, full(25.0))
    assert torch.allclose(ipo_loss(*same, beta=0.5).losses, full(1.0))
    # APO-zero: -sigma(0) + sigma(0) = 0; APO-down: sigma(0) - sigma(0) = 0
    assert torch.allclose(apo_zero_loss(*same).losses, full(0.0))
    assert torch.allclose(apo_down_loss(*same).losses, full(0.0))
    # DPO + NLL: ln 2 + alpha * (-log pi(y_c) / |y_c|)
    assert torch.allclose(dpo_nll_loss(*same, n_c, alpha=0.5).losses, LN2 + 0.5 * (-logp_c / n_c))
    # implicit rewards beta * Delta are 0
    result = dpo_loss(*same)
    assert result.chosen_rewards.abs().max() == 0 and result.rejected_rewards.abs().max() == 0

    # KTO: Delta = 0 and the mismatched pairs give z_0 = 0, so each example is lambda (1 - sigma(0)):
    # 0.5 with unit weights, and the batch mean is the paper's 0.5
    desirable = torch.tensor([True, False, True, False, False])
    kto = kto_loss(logp_c, logp_c, desirable, logp_r, logp_r)
    assert torch.allclose(kto.losses, full(0.5)) and kto.losses.mean().item() == pytest.approx(0.5)
    assert kto.metrics["kl"].item() == 0.0
    weighted = kto_loss(logp_c, logp_c, desirable, logp_r, logp_r, undesirable_weight=1.33).losses
    assert torch.allclose(weighted, torch.where(desirable, 0.5, 0.665).double())


# ---------------------------------------------------------------- hand-derived values and gradients


def test_dpo_value_and_gradient():
    pi_c, pi_r, ref_c, ref_r = pairs()
    result = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # L = -log sigma(beta h) = softplus(-beta h): softplus(-1) = 0.3132617, softplus(1) = 1.3132617
    assert result.losses.tolist() == approx([softplus(-1), softplus(1)])
    # rewards beta * Delta
    assert result.chosen_rewards.tolist() == [0.5, -0.5]
    assert result.rejected_rewards.tolist() == [-0.5, 0.5]
    assert not result.chosen_rewards.requires_grad
    # dL/dpi_c = -beta sigma(-beta h) = -0.5 sigma(-1) = -0.1344707, -0.5 sigma(1) = -0.3655293;
    # dL/dpi_r and dL/dref_c are its negatives, dL/dref_r equals it
    g = [-0.5 * sigmoid(-1), -0.5 * sigmoid(1)]
    minus_g = [-x for x in g]
    assert grads(result.losses, pi_c, pi_r, ref_c, ref_r) == [
        approx(g),
        approx(minus_g),
        approx(minus_g),
        approx(g),
    ]


def test_dpo_gradient_weight_is_the_books():
    """dL/dlog pi(y_c) = -beta sigma(r_r - r_c) (ch.8): autograd and central differences agree with it."""
    inputs = _random_inputs(seed=2)
    args = [inputs[k] for k in DIRECT_ALIGNMENT_LOSSES["dpo"].inputs]
    beta = 0.3
    result = dpo_loss(*args, beta=beta)
    weight = -beta * torch.sigmoid(result.rejected_rewards - result.chosen_rewards)
    (autograd,) = torch.autograd.grad(result.losses.sum(), args[0])
    assert torch.allclose(autograd, weight, rtol=1e-12)
    step = 1e-6
    central = (
        dpo_loss(args[0] + step, *args[1:], beta=beta).losses
        - dpo_loss(args[0] - step, *args[1:], beta=beta).losses
    ) / (2 * step)
    assert torch.allclose(central, weight, rtol=1e-7, atol=1e-10)


def test_cdpo_value():
    # L = (1 - eps) softplus(-z) + eps softplus(z) with z = beta h; softplus(z) - softplus(-z) = z, so
    # L = softplus(-z) + eps z: z = 1 -> 0.3132617 + 0.1 = 0.4132617, z = -1 -> 1.3132617 - 0.1 = 1.2132617
    pi_c, pi_r, ref_c, ref_r = pairs()
    result = cdpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, label_smoothing=0.1)
    assert result.losses.tolist() == approx([softplus(-1) + 0.1, softplus(1) - 0.1])
    # dL/dz = -(1 - eps) sigma(-z) + eps sigma(z); dL/dpi_c = beta dL/dz
    g = [0.5 * (-0.9 * sigmoid(-z) + 0.1 * sigmoid(z)) for z in (1, -1)]
    assert grads(result.losses, pi_c) == [approx(g)]


def test_ipo_value_and_gradient():
    pi_c, pi_r, ref_c, ref_r = pairs()
    result = ipo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # target 1/(2 beta) = 1: (2 - 1)^2 = 1, (-2 - 1)^2 = 9
    assert result.losses.tolist() == approx([1.0, 9.0])
    # dL/dpi_c = 2 (h - 1) = 2, -6; dL/dpi_r = -2 (h - 1)
    assert grads(result.losses, pi_c, pi_r) == [approx([2.0, -6.0]), approx([-2.0, 6.0])]
    assert result.chosen_rewards.tolist() == [0.5, -0.5]


def test_dpo_norm_value_and_gradient():
    # averages: pi_c -6/3 = -2, ref_c -9/3 = -3, pi_r -12/4 = -3, ref_r -8/4 = -2
    # h = (-2 + 3) - (-3 + 2) = 2, beta 2 -> z = 4: L = softplus(-4) = 0.0181499
    # (DPO on the sums would see h = 3 - (-4) = 7)
    pi_c, pi_r, ref_c, ref_r = t(-6.0), t(-12.0), t(-9.0), t(-8.0)
    n_c, n_r = torch.tensor([3]), torch.tensor([4])
    result = dpo_norm_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r)
    assert result.losses.tolist() == approx([softplus(-4)])
    assert result.chosen_rewards.tolist() == [2.0] and result.rejected_rewards.tolist() == [-2.0]
    # dL/dpi_c = -beta sigma(-z) / |y_c|, dL/dpi_r = +beta sigma(-z) / |y_r|
    assert grads(result.losses, pi_c, pi_r) == [approx([-2 * sigmoid(-4) / 3]), approx([2 * sigmoid(-4) / 4])]


def test_simpo_value_and_gradient():
    # beta 2, g = gamma/beta 0.5 (the paper's gamma = 1):
    #   pair 0: avg_c -3/3 = -1, avg_r -6/4 = -1.5: z = 2 (0.5 - 0.5) = 0 -> ln 2
    #   pair 1: avg_c -2/2 = -1, avg_r -8/4 = -2:   z = 2 (1 - 0.5) = 1   -> softplus(-1) = 0.3132617
    pi_c, pi_r = t(-3.0, -2.0), t(-6.0, -8.0)
    n_c, n_r = torch.tensor([3, 2]), torch.tensor([4, 4])
    result = simpo_loss(pi_c, pi_r, n_c, n_r)
    assert result.losses.tolist() == approx([LN2, softplus(-1)])
    # the same as the paper's form -log sigma(beta avg_c - beta avg_r - gamma) with gamma = beta * g
    paper = -F.logsigmoid(2 * pi_c / n_c - 2 * pi_r / n_r - 1.0)
    assert torch.allclose(result.losses, paper, rtol=1e-12)
    # rewards beta * avg
    assert result.chosen_rewards.tolist() == [-2.0, -2.0] and result.rejected_rewards.tolist() == [-3.0, -4.0]
    # dL/dpi_c = -beta sigma(-z) / |y_c| = -1/3, -sigma(-1)
    # dL/dpi_r = +beta sigma(-z) / |y_r| = 1/4, sigma(-1)/2
    assert grads(result.losses, pi_c, pi_r) == [
        approx([-1 / 3, -sigmoid(-1)]),
        approx([0.25, sigmoid(-1) / 2]),
    ]


def test_orpo_value_and_gradient():
    # avg_c = ln(1/2) (p = 1/2, odds 1, log odds 0); avg_r = ln(1/4) (p = 1/4, odds 1/3, log odds -ln 3)
    # log odds ratio = ln 3; or term = -lambda log sigma(ln 3) = -0.1 ln(3/4); sft = -avg_c = ln 2
    # L = ln 2 + 0.1 ln(4/3) = 0.7219149
    pi_c, pi_r = t(2 * math.log(0.5)), t(3 * math.log(0.25))
    n_c, n_r = torch.tensor([2]), torch.tensor([3])
    result = orpo_loss(pi_c, pi_r, n_c, n_r, odds_ratio_weight=0.1)
    assert result.losses.tolist() == approx([LN2 + 0.1 * math.log(4 / 3)])
    assert result.metrics["log_odds_ratio"].tolist() == approx([math.log(3)])
    assert result.metrics["sft_loss"].tolist() == approx([LN2])
    assert result.metrics["or_loss"].tolist() == approx([0.1 * math.log(4 / 3)])
    assert result.chosen_rewards.tolist() == approx([0.1 * math.log(0.5)])
    # d log_odds(a)/da = 1/(1 - e^a): 2 at a = ln 1/2, 4/3 at ln 1/4
    # d softplus(-LOR)/dLOR = -sigma(-ln 3) = -1/4
    # dL/davg_c = -1 + 0.1 (-1/4)(2) = -1.05 -> dL/dpi_c = -1.05 / 2 = -0.525
    # dL/davg_r = 0.1 (-1/4)(-4/3) = 1/30 -> dL/dpi_r = 1/90
    assert grads(result.losses, pi_c, pi_r) == [approx([-0.525]), approx([1 / 90])]


def test_orpo_is_finite_where_the_odds_blow_up():
    # an average log-prob of exactly 0 (p = 1) has infinite odds: clamped just below 0
    pi_c, pi_r = t(0.0), t(-1.0)
    result = orpo_loss(pi_c, pi_r, torch.tensor([4]), torch.tensor([4]))
    (g,) = torch.autograd.grad(result.losses.sum(), pi_r)
    assert torch.isfinite(result.losses).all() and torch.isfinite(g).all()


def test_log1mexp_is_accurate_in_float32_at_both_ends():
    a = [-1e-7, -1e-4, -0.5, -math.log(2), -0.7, -1.0, -20.0, -80.0]
    exact = [math.log(-math.expm1(x)) for x in a]  # float64
    got = log1mexp(torch.tensor(a, dtype=torch.float32)).tolist()
    assert got == pytest.approx(exact, rel=1e-6, abs=1e-30)


def test_kto_value_and_gradient():
    # beta 0.5, lambda_D 1, lambda_U 1.33. Delta = [-2 + 5, -6 + 5] = [3, -1].
    # Mismatched pairs: log-ratios [-4 + 5, -7 + 8] = [1, 1] -> z_0 = 1.
    #   desirable:   1 - sigma(0.5 (3 - 1)) = sigma(-1) = 0.2689414
    #   undesirable: 1.33 (1 - sigma(0.5 (1 + 1))) = 1.33 sigma(-1) = 0.3576921
    policy, reference = t(-2.0, -6.0), t(-5.0, -5.0)
    kl_policy, kl_reference = t(-4.0, -7.0), t(-5.0, -8.0)
    desirable = torch.tensor([True, False])
    result = kto_loss(
        policy, reference, desirable, kl_policy, kl_reference, beta=0.5, undesirable_weight=1.33
    )
    assert result.losses.tolist() == approx([sigmoid(-1), 1.33 * sigmoid(-1)])
    assert result.metrics["kl"].item() == 1.0
    assert result.rewards.tolist() == [1.5, -0.5]
    assert result.chosen_rewards.tolist() == [1.5] and result.rejected_rewards.tolist() == [-0.5]
    # dL/dDelta: desirable -lambda_D beta sigma'(u), undesirable +lambda_U beta sigma'(u), u = 1 both,
    # sigma'(1) = sigma(1) sigma(-1) = 0.1966119 -> [-0.0983060, 0.1307469]
    d = sigmoid(1) * sigmoid(-1)
    assert grads(result.losses, policy) == [approx([-0.5 * d, 1.33 * 0.5 * d])]
    # z_0 is detached: no gradient flows into the mismatched pairs
    assert torch.autograd.grad(result.losses.sum(), kl_policy, allow_unused=True) == (None,)
    # a 0/1 label tensor is read the same way
    as_int = kto_loss(policy, reference, torch.tensor([1, 0]), kl_policy, kl_reference, beta=0.5)
    assert as_int.losses.tolist() == approx([sigmoid(-1), sigmoid(-1)])


def test_kto_reference_point_is_clamped_at_zero():
    # mismatched log-ratios average -2 < 0 -> z_0 = 0:
    #   desirable 1 - sigma(0.5 * 3) = sigma(-1.5); undesirable 1 - sigma(0.5 * 1) = sigma(-0.5)
    result = kto_loss(t(-2.0, -6.0), t(-5.0, -5.0), torch.tensor([True, False]), t(-7.0), t(-5.0), beta=0.5)
    assert result.metrics["kl"].item() == 0.0
    assert result.losses.tolist() == approx([sigmoid(-1.5), sigmoid(-0.5)])


def test_apo_values_and_gradients():
    pi_c, pi_r, ref_c, ref_r = pairs()
    # APO-zero: -sigma(beta Delta_c) + sigma(beta Delta_r), sigma(x) - sigma(-x) = tanh(x/2):
    #   pair 0: -sigma(0.5) + sigma(-0.5) = -tanh(0.25) = -0.2449187; pair 1: +tanh(0.25)
    zero = apo_zero_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    assert zero.losses.tolist() == approx([-math.tanh(0.25), math.tanh(0.25)])
    # dL/dpi_c = -beta sigma'(beta Delta_c), dL/dpi_r = +beta sigma'(beta Delta_r); sigma'(+-0.5) equal
    d = sigmoid(0.5) * sigmoid(-0.5)
    assert grads(zero.losses, pi_c, pi_r) == [approx([-0.5 * d] * 2), approx([0.5 * d] * 2)]
    # APO-down: sigma(beta Delta_c) - sigma(beta h):
    #   pair 0: sigma(0.5) - sigma(1) = -0.1085993; pair 1: sigma(-0.5) - sigma(-1) = +0.1085993
    down = apo_down_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    assert down.losses.tolist() == approx([sigmoid(0.5) - sigmoid(1), sigmoid(-0.5) - sigmoid(-1)])
    # dL/dpi_c = beta (sigma'(beta Delta_c) - sigma'(beta h)), dL/dpi_r = beta sigma'(beta h)
    dh = sigmoid(1) * sigmoid(-1)
    assert grads(down.losses, pi_c, pi_r) == [approx([0.5 * (d - dh)] * 2), approx([0.5 * dh] * 2)]


def test_dpo_nll_value_and_gradient():
    # DPO part as in test_dpo_value_and_gradient; NLL = -pi_c / |y_c| = 4/2 = 2, 7/7 = 1; alpha 1
    pi_c, pi_r, ref_c, ref_r = pairs()
    n_c = torch.tensor([2, 7])
    result = dpo_nll_loss(pi_c, pi_r, ref_c, ref_r, n_c, beta=0.5, alpha=1.0)
    assert result.losses.tolist() == approx([softplus(-1) + 2, softplus(1) + 1])
    assert result.metrics["nll"].tolist() == [2.0, 1.0]
    assert result.chosen_rewards.tolist() == [0.5, -0.5]
    # dL/dpi_c = -beta sigma(-beta h) - alpha / |y_c|
    assert grads(result.losses, pi_c) == [approx([-0.5 * sigmoid(-1) - 1 / 2, -0.5 * sigmoid(1) - 1 / 7])]


# ---------------------------------------------------------------- all losses


def _random_inputs(seed: int, batch: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def logps() -> torch.Tensor:
        values = -(torch.rand(batch, generator=generator, dtype=torch.float64) * 20 + 0.5)
        return values.requires_grad_()

    def lengths() -> torch.Tensor:
        return torch.randint(1, 12, (batch,), generator=generator)

    names = ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps"]
    names += ["reference_rejected_logps", "policy_logps", "reference_logps"]
    names += ["policy_kl_logps", "reference_kl_logps"]
    inputs = {name: logps() for name in names}
    inputs |= {"chosen_lengths": lengths(), "rejected_lengths": lengths()}
    inputs["desirable"] = torch.rand(batch, generator=generator) < 0.5
    return inputs


@pytest.mark.parametrize("name", sorted(DIRECT_ALIGNMENT_LOSSES))
def test_gradients_match_finite_differences(name):
    spec = DIRECT_ALIGNMENT_LOSSES[name]
    inputs = _random_inputs(seed=3)
    args = {arg: inputs[arg] for arg in spec.inputs}
    # z_0's inputs are detached on purpose (finite differences would see them), lengths are counts
    varied = [arg for arg in spec.inputs if arg.endswith("logps") and "_kl_" not in arg]
    fixed = {arg: value for arg, value in args.items() if arg not in varied}

    hyper = {"beta": 0.3} if "beta" in spec.hyperparameters else {}

    def losses(*values: torch.Tensor) -> torch.Tensor:
        return spec.fn(**dict(zip(varied, values, strict=True)), **fixed, **hyper).losses

    assert torch.autograd.gradcheck(losses, tuple(args[arg] for arg in varied))


@pytest.mark.parametrize("name", ["dpo_norm", "simpo", "orpo", "dpo_nll"])
def test_length_normalised_losses_see_only_averages(name):
    """Tripling a completion's summed log-prob and its length leaves its average, hence the loss, alone."""
    spec = DIRECT_ALIGNMENT_LOSSES[name]
    inputs = _random_inputs(seed=4)
    args = {arg: inputs[arg].detach() for arg in spec.inputs}
    longer = dict(args)
    for side in ("chosen", "rejected"):
        if f"{side}_lengths" in args and name != "dpo_nll":
            longer[f"{side}_lengths"] = 3 * args[f"{side}_lengths"]
            for model in ("policy", "reference"):
                if f"{model}_{side}_logps" in args:
                    longer[f"{model}_{side}_logps"] = 3 * args[f"{model}_{side}_logps"]
    if name == "dpo_nll":  # only its NLL is length-normalised; the DPO part uses sums
        before = spec.fn(**args).metrics["nll"]
        longer["policy_chosen_logps"] = 3 * args["policy_chosen_logps"]
        longer["chosen_lengths"] = 3 * args["chosen_lengths"]
        assert torch.allclose(spec.fn(**longer).metrics["nll"], before, rtol=1e-12)
        return
    before, after = spec.fn(**args), spec.fn(**longer)
    assert torch.allclose(after.losses, before.losses, rtol=1e-12)
    assert torch.allclose(after.chosen_rewards, before.chosen_rewards, rtol=1e-12)
    # the summed-log-prob DPO sees the change
    if name == "dpo_norm":
        plain = DIRECT_ALIGNMENT_LOSSES["dpo"]
        plain_args = [longer[a] for a in plain.inputs], [args[a] for a in plain.inputs]
        assert not torch.allclose(plain.fn(*plain_args[0]).losses, plain.fn(*plain_args[1]).losses)


# ---------------------------------------------------------------- sequence_logprobs


def _garbage_batch(dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batch, length, vocab = 5, 14, 37
    logits = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    prompt = [3, 5, 1, 8, 14]  # the last row: no completion token at all
    padding = [0, 4, 2, 0, 0]
    for row in range(batch):
        labels[row, : prompt[row]] = IGNORE_INDEX
        if padding[row]:
            labels[row, length - padding[row] :] = IGNORE_INDEX
    # every position whose next label is ignored holds garbage: large logits of either sign
    ignored = labels[:, 1:] == IGNORE_INDEX
    garbage = torch.randn(batch, length - 1, vocab, generator=generator, dtype=torch.float64) * 1e4
    logits[:, :-1][ignored] = garbage[ignored]
    logits[:, -1] = garbage[:, 0]  # the last position predicts nothing
    return logits.to(dtype).requires_grad_(), labels


def _full_log_softmax_reference(logits: torch.Tensor, labels: torch.Tensor):
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)  # (B, T-1, V): what the helper never builds
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, 0.0).sum(-1), keep.sum(-1)


@pytest.mark.parametrize("chunk_rows", [None, 1, 2])
def test_sequence_logprobs_equals_full_log_softmax_and_ignores_garbage(chunk_rows):
    logits, labels = _garbage_batch(torch.float64)
    sum_logp, n_tokens = logits_sequence_logprobs(logits, labels, chunk_rows=chunk_rows)
    expected_sum, expected_n = _full_log_softmax_reference(logits, labels)
    assert (
        n_tokens.tolist() == expected_n.tolist() == [11, 5, 11, 6, 0]
    )  # completion positions 3-13, 5-9, 1-11, 8-13, none
    assert sum_logp.dtype == torch.float64
    assert torch.allclose(sum_logp, expected_sum, rtol=1e-12, atol=1e-12)
    assert sum_logp[-1].item() == 0.0
    # gradients too, and nothing reaches the garbage positions
    (got,) = torch.autograd.grad(sum_logp.sum(), logits)
    (want,) = torch.autograd.grad(expected_sum.sum(), logits)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    ignored = labels[:, 1:] == IGNORE_INDEX
    assert got[:, :-1][ignored].abs().max().item() == 0.0 and got[:, -1].abs().max().item() == 0.0


def test_sequence_logprobs_upcasts_low_precision_logits():
    logits, labels = _garbage_batch(torch.bfloat16, seed=1)
    sum_logp, _ = logits_sequence_logprobs(logits, labels)
    expected, _ = _full_log_softmax_reference(logits.float(), labels)
    assert sum_logp.dtype == torch.float32
    assert torch.allclose(sum_logp.double(), expected, rtol=1e-5, atol=1e-4)


def test_sequence_logprobs_ignores_non_finite_garbage():
    """A reference forward pass (no grad) may leave inf or nan on padding positions: they must not leak."""
    logits, labels = _garbage_batch(torch.float64, seed=2)
    expected, _ = _full_log_softmax_reference(logits.detach(), labels)
    spoiled = logits.detach().clone()
    ignored = labels[:, 1:] == IGNORE_INDEX
    spoiled[:, :-1][ignored] = float("nan")
    spoiled[:, -1] = float("inf")
    with torch.no_grad():
        sum_logp, _ = logits_sequence_logprobs(spoiled, labels)
    assert torch.allclose(sum_logp, expected, rtol=1e-12, atol=1e-12)
