"""Schedule, samplers and guidance against exact answers on Gaussians."""

import math

import pytest
import torch

from scldiff.diffusion import (
    DEFAULT_STEPS,
    SAMPLERS,
    ClassifierFreeGuidance,
    VPSchedule,
    check_guidance_interval,
    compositional_epsilon,
    guided_epsilon,
    invert_ddim,
)

SCHEDULE = VPSchedule()


def exact_eps(mean: torch.Tensor, cov: torch.Tensor, schedule: VPSchedule):
    r"""Exact noise predictor for z_0 ~ N(m, C): eps* = sigma (a^2 C + s^2 I)^-1 (z - a m)."""

    evals, evecs = torch.linalg.eigh(cov)

    def eps(z, t):
        t = t.reshape(-1)[:1]  # one time for all rows (0-d from the samplers)
        a, s = schedule.alpha(t).to(z.dtype), schedule.sigma(t).to(z.dtype)
        return s * ((z - a * mean) @ evecs / (a**2 * evals + s**2)) @ evecs.T

    return eps


def test_schedule_ends_at_standard_normal():
    # z_1 must be N(0, I) for sampling to start from pure noise (the LapDDPM paper's T=1,
    # a=e^-t fails).
    assert SCHEDULE.prior_kl(data_variance=1.0) < 1e-4
    assert SCHEDULE.prior_kl(data_variance=25.0) < 2e-3
    t = torch.tensor([0.0, 0.3, 1.0])
    assert torch.allclose(SCHEDULE.alpha(t) ** 2 + SCHEDULE.sigma(t) ** 2, torch.ones(3))
    assert SCHEDULE.alpha(torch.tensor(0.0)) == 1.0
    a_public = math.exp(-1.0)  # the public code's alpha at T = 1
    assert VPSchedule().alpha(torch.tensor(1.0)) < a_public / 50


def test_add_noise_has_the_right_marginals():
    g = torch.Generator().manual_seed(0)
    z0 = torch.full((200_000, 1), 3.0)
    t = torch.full((200_000,), 0.4)
    zt = SCHEDULE.add_noise(z0, torch.randn(z0.shape, generator=g), t)
    a, s = SCHEDULE.alpha(torch.tensor(0.4)), SCHEDULE.sigma(torch.tensor(0.4))
    assert zt.mean().item() == pytest.approx(3.0 * a.item(), abs=0.01)
    assert zt.std().item() == pytest.approx(s.item(), rel=0.01)


def test_velocity_has_its_known_values_and_gives_back_the_noise():
    # z_0 = 2, eps = 1: v = alpha - 2 sigma; at t = 1 (alpha ~ 0.0066) v ~ -2 sigma_1 ~ -z_0
    z0, eps = torch.full((3, 2), 2.0), torch.ones(3, 2)
    t = torch.tensor([SCHEDULE.t_min, 0.5, 1.0])
    a, s = SCHEDULE.alpha(t).view(-1, 1), SCHEDULE.sigma(t).view(-1, 1)
    v = SCHEDULE.velocity(z0, eps, t)
    torch.testing.assert_close(v, (a - 2.0 * s).expand(3, 2))
    assert v[2, 0].item() == pytest.approx(-2.0, abs=0.01)  # the target is about -z_0
    g = torch.Generator().manual_seed(0)
    z0, eps = 3.0 * torch.randn(1000, 4, generator=g), torch.randn(1000, 4, generator=g)
    t = SCHEDULE.sample_time(1000, generator=g)
    zt = SCHEDULE.add_noise(z0, eps, t)
    torch.testing.assert_close(SCHEDULE.noise_from_velocity(zt, SCHEDULE.velocity(z0, eps, t), t),
                               eps, atol=1e-5, rtol=0)


def test_beta_is_the_derivative_of_the_integral():
    t = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    h = 1e-6
    numeric = (SCHEDULE.integral_beta(t + h) - SCHEDULE.integral_beta(t - h)) / (2 * h)
    assert torch.allclose(numeric, SCHEDULE.beta(t), rtol=1e-6)


def test_first_order_ddim_converges_and_second_order_ode_is_more_accurate():
    # The flow map of N(0, 0.25) sends z_1 = 1 to 0.5; DDIM's error halves with the step,
    # DPM-Solver++(2M)'s falls about four-fold.
    def eps(z, t):
        a, s = SCHEDULE.alpha(t.double()), SCHEDULE.sigma(t.double())
        return s * z / (a**2 * 0.25 + s**2)

    z = torch.ones(1, 1, dtype=torch.float64)
    err = {(name, n): abs(SAMPLERS[name](eps, z, SCHEDULE, n).item() - 0.5)
           for name in ("ddim", "ode") for n in (20, 40, 80)}
    assert 1.6 < err["ddim", 20] / err["ddim", 40] < 2.4
    assert err["ode", 40] / err["ode", 80] > 3.0
    assert err["ode", 40] < err["ddim", 40] / 10


@pytest.mark.parametrize("name,n_steps,tol", [("ddim", 400, 0.01),
                                              ("ode", 30, 0.01),
                                              ("ode", DEFAULT_STEPS["ode"], 0.025),
                                              ("sde", 1000, 0.01)])
def test_sampler_reproduces_1d_gaussian(name, n_steps, tol):
    mean = torch.tensor([2.0], dtype=torch.float64)
    cov = torch.tensor([[0.25]], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(40_000, 1, generator=g, dtype=torch.float64)
    out = SAMPLERS[name](exact_eps(mean, cov, SCHEDULE), z, SCHEDULE, n_steps, generator=g)
    # 40k samples: standard errors 0.0025 (mean) and 0.7% (variance)
    assert out.mean().item() == pytest.approx(2.0, abs=2 * tol)
    assert out.var().item() == pytest.approx(0.25, rel=3 * tol)


@pytest.mark.parametrize("name,n_steps", [("ddim", 400), ("ode", 30),
                                          ("sde", 1000)])
def test_sampler_reproduces_correlated_2d_gaussian(name, n_steps):
    mean = torch.tensor([-1.0, 3.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(40_000, 2, generator=g, dtype=torch.float64)
    out = SAMPLERS[name](exact_eps(mean, cov, SCHEDULE), z, SCHEDULE, n_steps, generator=g)
    assert torch.allclose(out.mean(0), mean, atol=0.03)
    assert torch.allclose(torch.cov(out.T), cov, atol=0.04)


def test_reverse_sde_with_flipped_score_sign_diverges():
    # The defect of the public LapDDPM code: the score's sign flipped and the drift dropped.
    # The same test harness must catch it, so the Gaussian tests above are not vacuous.
    mean = torch.tensor([2.0], dtype=torch.float64)
    cov = torch.tensor([[0.25]], dtype=torch.float64)
    eps = exact_eps(mean, cov, SCHEDULE)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(20_000, 1, generator=g, dtype=torch.float64)
    ts = SCHEDULE.timesteps(200)
    for i in range(200):
        t, h = ts[i], ts[i] - ts[i + 1]
        score = -eps(z, t.expand(z.shape[0])) / SCHEDULE.sigma(t)
        z = z - SCHEDULE.beta(t) * score * h + torch.sqrt(SCHEDULE.beta(t) * h) * torch.randn(
            z.shape, generator=g, dtype=z.dtype)
    wrong = (z.mean().item() - 2.0) ** 2 + (z.var().item() - 0.25) ** 2
    assert wrong > 0.1


def test_guidance_formula():
    eps_c, eps_u = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])
    assert torch.equal(guided_epsilon(eps_c, eps_u, 0.0), eps_u)
    assert torch.equal(guided_epsilon(eps_c, eps_u, 1.0), eps_c)
    assert torch.allclose(guided_epsilon(eps_c, eps_u, 2.0), 2 * eps_c - eps_u)
    # SCLD's (1 + omega) eps_c - omega eps_u with omega = w - 1
    w = 3.5
    assert torch.allclose(guided_epsilon(eps_c, eps_u, w), w * eps_c - (w - 1) * eps_u)


def _label_network(calls, with_time=False):
    """eps = the row's one attribute (10 where null), plus t with ``with_time``."""

    def network(z, t, attributes):
        calls.append(attributes.clone())
        eps = z * 0 + torch.nan_to_num(attributes[:, :1], nan=10.0)
        return eps + t.reshape(-1, 1) if with_time else eps

    return network


def test_guidance_wrapper_evaluates_both_branches():
    calls = []
    labels = torch.tensor([[2.0], [3.0]])
    z, t = torch.zeros(2, 4), torch.full((2,), 0.5)
    out = ClassifierFreeGuidance(_label_network(calls), labels, scale=2.0)(z, t)
    assert torch.allclose(out[:, 0], 2 * labels[:, 0] - 10)
    # one batch: the unconditional (null) rows, then the conditional ones
    assert torch.equal(torch.nan_to_num(calls[-1][:, 0], nan=-1.0),
                       torch.tensor([-1.0, -1.0, 2.0, 3.0]))
    assert torch.allclose(ClassifierFreeGuidance(_label_network(calls), labels, 0.0)(z, t)[:, 0],
                          torch.full((2,), 10.0))


def test_compositional_guidance_against_hand_computed_values():
    eps_u = torch.tensor([[1.0, 2.0]])
    eps_a, eps_b = torch.tensor([[3.0, 2.0]]), torch.tensor([[1.0, 6.0]])
    # eps_u + 2 (eps_a - eps_u) + 0.5 (eps_b - eps_u) = [1 + 4 + 0, 2 + 0 + 2]
    assert torch.equal(compositional_epsilon([eps_a, eps_b], eps_u, [2.0, 0.5]),
                       torch.tensor([[5.0, 4.0]]))
    # an additive network: eps(c) = 100 + 1 * c_0 + 2 * c_1 (a null term adds 0), so that
    # eps_a - eps_null = (a + 1) c_a and the guided noise is 100 + sum_a w_a (a + 1) c_a
    calls = []

    def network(z, t, attributes):
        calls.append(attributes.shape[0])
        terms = torch.nan_to_num(attributes, nan=0.0) * torch.tensor([1.0, 2.0])
        return z * 0 + 100 + terms.sum(1, keepdim=True)

    rows = torch.tensor([[3.0, 4.0], [5.0, float("nan")]])
    z, t = torch.zeros(2, 3), torch.tensor(0.4)
    out = ClassifierFreeGuidance(network, rows, scale=[2.0, 0.5])(z, t)
    assert torch.allclose(out[:, 0], torch.tensor([100 + 2 * 3 + 0.5 * 2 * 4, 100 + 2 * 5]))
    assert calls[-1] == 6  # null, attribute 0 alone, attribute 1 alone: one batch
    # a scale of 0 costs no evaluation; the joint scale composes nothing
    out = ClassifierFreeGuidance(network, rows, scale=[1.5, 0.0])(z, t)
    assert torch.allclose(out[:, 0], torch.tensor([100 + 1.5 * 3, 100 + 1.5 * 5]))
    assert calls[-1] == 4
    joint = ClassifierFreeGuidance(network, rows, scale=2.0)(z, t)
    assert torch.allclose(joint[:, 0], torch.tensor([100.0 + 2 * (3 + 8), 100.0 + 2 * 5]))
    with pytest.raises(ValueError, match="2 attributes"):
        ClassifierFreeGuidance(network, rows, scale=[1.0])


def test_guidance_interval_guides_inside_and_evaluates_once_outside():
    calls = []
    network = _label_network(calls, with_time=True)
    labels = torch.tensor([[2.0], [3.0]])
    c = labels[:, 0]
    guide = ClassifierFreeGuidance(network, labels, scale=2.0, interval=(0.2, 0.5))
    z = torch.zeros(2, 4)
    # inside (the ends included): 2 (c + t) - (10 + t) = 2c + t - 10, from one batch of 4
    for time in (0.2, 0.3, 0.5):
        out = guide(z, torch.full((2,), time))
        assert torch.allclose(out[:, 0], 2 * c + time - 10)
        assert calls[-1].shape[0] == 4
    # outside: the conditional prediction, from one evaluation of the 2 rows only
    for time in (0.1, 0.9, 1.0):
        out = guide(z, torch.full((2,), time))
        assert torch.allclose(out[:, 0], c + time)
        assert calls[-1].shape[0] == 2
    # rows at different times: each row by its own time
    out = guide(z, torch.tensor([0.3, 0.9]))
    assert torch.allclose(out[:, 0], torch.tensor([2 * 2 + 0.3 - 10, 3 + 0.9]))
    # one time for all rows (0-d, as the samplers pass it): guided inside, not outside
    for time, guided in ((0.3, True), (0.9, False)):
        calls.clear()
        out = guide(z, torch.tensor(time))
        expected = 2 * c + time - 10 if guided else c + time
        assert torch.allclose(out[:, 0], expected)
        assert [x.shape[0] for x in calls] == [4 if guided else 2]
    # scale 0 inside the interval is the unconditional prediction
    guide0 = ClassifierFreeGuidance(network, labels, 0.0, interval=(0.2, 0.5))
    assert torch.allclose(guide0(z, torch.tensor([0.3, 0.9]))[:, 0],
                          torch.tensor([10.3, 3.9]))


def test_guidance_interval_is_checked():
    assert check_guidance_interval(None) is None
    assert check_guidance_interval([0, 1]) == (0.0, 1.0)
    for bad in [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.1,), "ab", 0.5, (0.1, float("nan"))]:
        with pytest.raises(ValueError, match="guidance_interval"):
            check_guidance_interval(bad)


def test_guided_sampling_of_two_gaussians_moves_towards_the_condition():
    # p(z|c) = N(mu_c, s^2), p(z) = mixture: w = 1 samples the conditional exactly,
    # w > 1 overshoots away from the unconditional mixture mean.
    s2, mus = 0.09, torch.tensor([-1.0, 1.0], dtype=torch.float64)

    def network(z, t, attributes):
        null = torch.isnan(attributes[:, 0])
        labels = torch.nan_to_num(attributes[:, 0], nan=1.0).long()
        a, s = SCHEDULE.alpha(t).reshape(-1, 1), SCHEDULE.sigma(t).reshape(-1, 1)
        var = a**2 * s2 + s**2
        cond = s * (z - a * mus[labels][:, None]) / var
        logits = -((z - a * mus[None, :]) ** 2) / (2 * var)
        post = torch.softmax(logits, dim=1)
        uncond = s * (z - a * (post * mus[None, :]).sum(1, keepdim=True)) / var
        return torch.where(null[:, None], uncond, cond)

    g = torch.Generator().manual_seed(4)
    z = torch.randn(50_000, 1, generator=g, dtype=torch.float64)
    rows = torch.ones(50_000, 1, dtype=torch.float64)
    out1 = SAMPLERS["ode"](ClassifierFreeGuidance(network, rows, 1.0), z, SCHEDULE, 100)
    out3 = SAMPLERS["ode"](ClassifierFreeGuidance(network, rows, 3.0), z, SCHEDULE, 100)
    assert out1.mean().item() == pytest.approx(1.0, abs=0.01)
    assert out1.var().item() == pytest.approx(s2, rel=0.05)
    assert out3.mean().item() > 1.0


@pytest.mark.parametrize("categories, n_continuous", [([4], 0), ([4, 2], 1)])
def test_scorenet_with_one_time_computes_each_labels_condition_once(categories, n_continuous):
    """A sampler's step shares t across the rows: the conditions are a table with one row
    per label (one label: every category and the null token) or per distinct attribute row
    (several), which each row gathers; the same outputs as per row."""
    from scldiff.module import ScoreNet

    torch.manual_seed(0)
    net = ScoreNet(n_latent=5, n_categories=categories, n_continuous=n_continuous,
                   n_hidden=32, n_blocks=2).eval()
    with torch.no_grad():
        for p in net.parameters():  # FiLM starts at zero: randomise it so labels matter
            p.normal_(0, 0.3)
    z = torch.randn(50, 5)
    labels = torch.stack([torch.randint(0, n, (50,)).float() for n in categories]
                         + [torch.randint(0, 3, (50,)).float() - 1.0] * n_continuous, 1)
    labels[torch.rand(labels.shape) < 0.2] = float("nan")  # null entries
    t = torch.tensor(0.37)

    def per_cell(z, t, labels):  # the plain per-cell computation
        cond, h = net.condition(t.expand(z.shape[0]), labels), net.inp(z)
        for block in net.blocks:
            h = block(h, cond)
        return net.out(net.out_norm(h))

    with torch.no_grad():
        shared, reference = net(z, t, labels), per_cell(z, t, labels)
        torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(z, t.expand(50), labels), reference,
                                   rtol=1e-5, atol=1e-5)
        # each cell's output depends on its own attributes, each of them
        for a in range(labels.shape[1]):
            other = labels.clone()
            other[:, a] = torch.where(torch.isnan(other[:, a]), 0.0, float("nan"))
            assert not torch.allclose(shared, net(z, t, other), atol=1e-3)
        t_varied = torch.rand(50)
        torch.testing.assert_close(net(z, t_varied, labels), per_cell(z, t_varied, labels))
    # gradients flow through the table too
    grad = torch.autograd.grad(net(z, t, labels).sum(), net.category_embeddings[0].weight)[0]
    present = torch.nan_to_num(labels[:, 0], nan=4).long().unique()
    assert grad[present].abs().sum(1).gt(0).all()
    # under bf16 autocast: as close to float32 as the per-cell computation under autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, plain = net(z, t, labels), per_cell(z, t, labels)
    error = (mixed.float() - shared).norm() / shared.norm()
    assert torch.isfinite(mixed).all() and error < 0.03
    assert error < 2 * (plain.float() - shared).norm() / shared.norm()


def test_fourier_features_against_hand_computed_values():
    from scldiff.module import fourier_features

    x = torch.tensor([0.0, 1.0, -2.0])
    out = fourier_features(x, frequencies=(math.pi / 2, math.pi))
    expected = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0],  # x, sin, sin, cos, cos
                             [1.0, 1.0, 0.0, 0.0, -1.0],
                             [-2.0, 0.0, 0.0, -1.0, 1.0]])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert fourier_features(x).shape == (3, 9)  # x and 4 frequencies' sines and cosines


def test_timesteps_start_where_asked_and_refuse_times_outside():
    ts = SCHEDULE.timesteps(5, t_start=0.4)
    assert ts[0].item() == pytest.approx(0.4) and ts[-1].item() == pytest.approx(SCHEDULE.t_min)
    assert bool((ts[1:] < ts[:-1]).all())
    for bad in (0.0, SCHEDULE.t_min, 1.5):
        with pytest.raises(ValueError, match="t_start"):
            SCHEDULE.timesteps(5, t_start=bad)


@pytest.mark.parametrize("name,n_steps", [("ddim", 200), ("ode", 30)])
def test_partial_noising_and_denoising_keeps_the_data_distribution(name, n_steps):
    # SDEdit on exact data: noised to t = 0.5 and denoised, N(2, 0.25) stays N(2, 0.25)
    mean = torch.tensor([2.0], dtype=torch.float64)
    cov = torch.tensor([[0.25]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    z0 = mean + 0.5 * torch.randn(40_000, 1, generator=g, dtype=torch.float64)
    t = torch.tensor(0.5, dtype=torch.float64)
    zt = SCHEDULE.add_noise(z0, torch.randn(z0.shape, generator=g, dtype=torch.float64), t)
    out = SAMPLERS[name](exact_eps(mean, cov, SCHEDULE), zt, SCHEDULE, n_steps, generator=g,
                         t_start=0.5)
    assert out.mean().item() == pytest.approx(2.0, abs=0.01)
    assert out.var().item() == pytest.approx(0.25, rel=0.03)


def test_ddim_inversion_reaches_the_noise_and_comes_back():
    # exact score of N(2, 0.25): the inverted path ends at the standard normal (z - 2) / 0.5
    # at t = 1, and DDIM from there gives back the data point
    mean = torch.tensor([2.0], dtype=torch.float64)
    cov = torch.tensor([[0.25]], dtype=torch.float64)
    eps = exact_eps(mean, cov, SCHEDULE)
    z0 = torch.linspace(0.5, 3.5, 13, dtype=torch.float64).reshape(-1, 1)
    noise = invert_ddim(eps, z0, SCHEDULE, 400, t_end=1.0)
    a1 = SCHEDULE.alpha(torch.tensor(1.0, dtype=torch.float64))
    expected = (a1 * 2.0 + torch.sqrt(a1**2 * 0.25 + 1 - a1**2) * (z0 - 2.0) / 0.5)
    assert torch.allclose(noise, expected, atol=0.03)  # DDIM's first-order error: under 1%
    # the way back is exact to first order: the error falls 4-fold with 4 times the steps
    errors = [(SAMPLERS["ddim"](eps, invert_ddim(eps, z0, SCHEDULE, n), SCHEDULE, n) - z0)
              .abs().max().item() for n in (400, 1600)]
    assert errors[1] < 0.006 and 3.5 < errors[0] / errors[1] < 4.5
    half = invert_ddim(eps, z0, SCHEDULE, 1600, t_end=0.5)
    assert torch.allclose(SAMPLERS["ddim"](eps, half, SCHEDULE, 1600, t_start=0.5), z0,
                          atol=0.006)


# ------------------------------------------------------- a spot's position as condition
def test_the_position_block_is_dropped_as_a_whole():
    from scldiff.module import drop_attributes

    rows = torch.ones(20_000, 2 + 3)
    dropped = drop_attributes(rows, 0.3, torch.Generator().manual_seed(0), blocks=[3])
    position = torch.isnan(dropped[:, 2:])
    assert bool((position.all(1) | ~position.any(1)).all())  # all three or none
    assert abs(position[:, 0].float().mean().item() - 0.3) < 0.02
    assert abs(torch.isnan(dropped[:, 0]).float().mean().item() - 0.3) < 0.02
    # the single attributes and the block are dropped independently
    both = (torch.isnan(dropped[:, 0]) & position[:, 0]).float().mean().item()
    assert abs(both - 0.09) < 0.01


def test_two_blocks_are_dropped_each_as_a_whole_and_apart():
    from scldiff.module import drop_attributes

    rows = torch.ones(20_000, 1 + 2 + 3)  # an attribute, a position, a chromatin block
    dropped = torch.isnan(drop_attributes(rows, 0.5, torch.Generator().manual_seed(1),
                                          blocks=[2, 3]))
    for columns in ([1, 2], [3, 4, 5]):
        block = dropped[:, columns]
        assert bool((block.all(1) | ~block.any(1)).all())
        assert abs(block[:, 0].float().mean().item() - 0.5) < 0.02
    assert abs((dropped[:, 1] & dropped[:, 3]).float().mean().item() - 0.25) < 0.015


def test_compositional_guidance_over_a_group_of_columns():
    def network(z, t, attributes):  # a function of which columns are given
        given = (~torch.isnan(attributes)).float()
        return z + given @ torch.tensor([[1.0], [10.0], [100.0]])

    rows = torch.tensor([[0.0, 0.5, 0.5]])
    z = torch.zeros(1, 1)
    guided = ClassifierFreeGuidance(network, rows, [2.0, 3.0], groups=[[0], [1, 2]])
    # eps_null = 0, eps_attribute = 1, eps_position = 110: 0 + 2 * 1 + 3 * 110
    assert guided(z, torch.tensor(0.5)).item() == pytest.approx(332.0)
    with pytest.raises(ValueError, match="2 guidance scales for 3"):
        ClassifierFreeGuidance(network, rows, [2.0, 3.0])


def test_scorenet_reads_the_position_and_its_null():
    from scldiff.module import ScoreNet

    torch.manual_seed(0)
    net = ScoreNet(4, n_categories=[3], blocks=[2], n_hidden=16, n_blocks=1)
    for p in net.parameters():  # FiLM starts at zero: give every weight a value
        torch.nn.init.normal_(p, std=0.3)
    z, t = torch.randn(3, 4), torch.tensor(0.5)
    rows = torch.tensor([[1.0, 0.2, -0.3], [1.0, 0.9, 0.4], [1.0, math.nan, math.nan]])
    out = net(z.repeat(1, 1), t, rows)
    assert not torch.allclose(out[0], net(z[:1], t, rows[1:2])[0])  # position matters
    null = net.attribute_embedding(rows[2:3]) - net.category_embeddings[0](torch.tensor([1]))
    torch.testing.assert_close(null[0], net.block_null[0])


def test_scorenet_reads_each_block_with_its_own_network():
    from scldiff.module import ScoreNet

    torch.manual_seed(0)
    net = ScoreNet(4, n_continuous=1, blocks=[2, 3], n_hidden=16, n_blocks=1)
    assert net.n_columns == 6 and net.block_columns() == [[1, 2], [3, 4, 5]]
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    row = torch.tensor([[math.nan, 0.1, 0.2, 0.3, -0.4, 0.5]])
    only_second = row.clone()
    only_second[:, 1:3] = math.nan
    expected = net.continuous_null[0] + net.block_null[0] + net.block_mlps[1](row[:, 3:])
    torch.testing.assert_close(net.attribute_embedding(only_second)[0], expected[0])
    with pytest.raises(ValueError, match="at least one column"):
        ScoreNet(4, blocks=[0])
