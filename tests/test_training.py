"""The training plan's maths on real minibatches: perturbation, masking, label dropout."""

import logging
import warnings

import numpy as np
import pytest
import scvi
import torch

import scldiff
from scldiff.module import BATCH_KEYS
from scldiff.train import ExponentialMovingAverage, GraphVAETrainingPlan, keep_mask

from .conftest import small_pbmc


@pytest.fixture(scope="module")
def model_and_batch():
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=300, n_genes=400)
    scldiff.LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=10, n_lpe=8)
    model = scldiff.LapDDPM(adata, n_latent=8, n_hidden=32, dropout_rate=0.0)
    collator = model._collator()
    batch = collator(list(range(0, 300, 5)))
    return model, batch


def stage_a_loss(module, batch, weight):
    _, _, out = module({**batch, BATCH_KEYS.EDGE_WEIGHT: weight},
                       inference_kwargs={"use_mean": True}, loss_kwargs={"kl_weight": 1.0})
    return out.loss.item()


@pytest.mark.parametrize("perturbation", ["spectral", "random"])
def test_adversarial_edge_weights_have_radius_epsilon_and_increase_the_loss(
        model_and_batch, perturbation):
    model, batch = model_and_batch
    module = model.module.eval()
    plan = GraphVAETrainingPlan(module, perturbation=perturbation, epsilon=0.1,
                               power_iterations=3, mask_fraction=0.0)
    plan.loss_kwargs["kl_weight"] = 1.0
    weight = batch[BATCH_KEYS.EDGE_WEIGHT]
    torch.manual_seed(0)
    adversarial, applied = plan.adversarial_edge_weight(batch)
    delta = adversarial - weight
    assert applied.item() == pytest.approx(0.1, rel=1e-5)
    assert delta.norm().item() == pytest.approx(0.1 * weight.norm().item(), rel=1e-5)
    assert (adversarial > 0).all()
    base = stage_a_loss(module, batch, weight)
    assert stage_a_loss(module, batch, adversarial) > base
    assert stage_a_loss(module, batch, adversarial) > stage_a_loss(module, batch, weight - delta)


def test_perturbation_changes_the_encoding(model_and_batch):
    # The public code's "adversarial" step added ~1e-7 to the weights: a no-op.
    model, batch = model_and_batch
    module = model.module.eval()
    plan = GraphVAETrainingPlan(module, epsilon=0.05, mask_fraction=0.0)
    plan.loss_kwargs["kl_weight"] = 1.0
    adversarial, _ = plan.adversarial_edge_weight(batch)
    inputs = module._get_inference_input(batch)
    before = module.inference(**inputs, use_mean=True)["qz_mean"]
    after = module.inference(**{**inputs, "edge_weight": adversarial}, use_mean=True)["qz_mean"]
    assert (after - before).abs().max().item() > 1e-4


def test_no_perturbation_leaves_weights_alone(model_and_batch):
    model, batch = model_and_batch
    plan = GraphVAETrainingPlan(model.module, perturbation="none")
    weight, applied = plan.adversarial_edge_weight(batch)
    assert weight is batch[BATCH_KEYS.EDGE_WEIGHT] and applied.item() == 0.0


def test_keep_mask_drops_each_value_independently_with_the_fraction():
    torch.manual_seed(0)
    n = 400_003  # not a multiple of 4: the last 64-bit integer is used in part
    for fraction in (0.0, 0.1, 0.3, 0.5):
        mask = keep_mask(n, fraction)
        assert mask.shape == (n,) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        dropped = 1 - mask
        sd = (fraction * (1 - fraction) / (n / 4)) ** 0.5 + 1e-9
        # each of the four 16-bit fields of a random integer, alone: all uniform
        for field in range(4):
            assert abs(dropped[field::4].mean().item() - fraction) < 5 * sd
        # neighbours (the same integer) independent: both dropped with probability f^2
        both = (dropped[0 : n - 1 : 4] * dropped[1::4]).mean().item()
        assert abs(both - fraction**2) < 5 * sd
    torch.manual_seed(1)
    first = keep_mask(1000, 0.2)
    torch.manual_seed(1)
    assert torch.equal(keep_mask(1000, 0.2), first)  # from the global generator
    assert not torch.equal(keep_mask(1000, 0.2), first)


def test_input_masking_zeroes_the_requested_fraction_of_encoder_inputs(model_and_batch):
    model, batch = model_and_batch
    plan = GraphVAETrainingPlan(model.module, mask_fraction=0.3)
    torch.manual_seed(0)
    mask = plan._input_mask(batch)
    assert mask.shape == batch[BATCH_KEYS.NODE_INPUT].shape
    assert 1 - mask.mean().item() == pytest.approx(0.3, abs=0.01)
    module = model.module.eval()
    inputs = module._get_inference_input(batch)
    masked = module.inference(**inputs, input_mask=mask, use_mean=True)["qz_mean"]
    plain = module.inference(**inputs, use_mean=True)["qz_mean"]
    assert (masked - plain).abs().max() > 1e-4
    # the likelihood still sees every count: the target is the unmasked counts
    inf, gen, out = module(batch, inference_kwargs={"input_mask": mask, "use_mean": True},
                           loss_kwargs={"kl_weight": 1.0})
    n_seed = batch[BATCH_KEYS.ATTRIBUTES].shape[0]
    crow = batch[BATCH_KEYS.NODE_CROW][: n_seed + 1]
    dense = torch.zeros(n_seed, 400)
    rows = torch.repeat_interleave(torch.arange(n_seed), crow.diff())
    dense[rows, batch[BATCH_KEYS.NODE_COL][: crow[-1]]] = batch[BATCH_KEYS.SEED_COUNTS]
    expected = -gen["params"].distribution(gen["library"]).log_prob(dense).sum(-1)
    torch.testing.assert_close(out.reconstruction_loss["reconstruction_loss"], expected,
                               rtol=1e-4, atol=1e-2)


def test_label_dropout_is_per_cell_and_diffusion_uses_posterior_samples(model_and_batch):
    model, _ = model_and_batch
    module = model.module
    seen = []
    handle = module.score_net.register_forward_hook(lambda m, args, out: seen.append(args))
    try:
        n = 20_000
        module.latent_mean.zero_()
        module.latent_std.fill_(1.0)
        labels = torch.zeros(n, 1)
        mean, logvar = torch.zeros(n, 8), torch.zeros(n, 8)
        torch.manual_seed(0)
        module.diffusion_loss(mean, logvar, labels, p_uncond=0.3)
        used = seen[-1][2]
        null = torch.isnan(used).float().mean().item()
        assert null == pytest.approx(0.3, abs=0.03)  # one coin per cell, not per batch
        # z_0 ~ q(z|x) = N(0, 1), so z_t ~ N(0, 1) at every t; with z_0 = mu (the public
        # code's defect) z_t would be N(0, sigma_t^2), sigma_t^2 < 0.11 for t < 0.1.
        z_t, t = seen[-1][0], seen[-1][1]
        early = z_t[t < 0.1]
        assert early.shape[0] > 500
        assert early.std().item() == pytest.approx(1.0, abs=0.05)
    finally:
        handle.remove()


def test_latent_statistics_standardise_the_aggregate_posterior(model_and_batch):
    model, _ = model_and_batch
    module = model.module
    g = torch.Generator().manual_seed(0)
    mean = 3.0 + 2.0 * torch.randn(50_000, 8, generator=g)
    logvar = torch.full((50_000, 8), np.log(0.25))
    module.set_latent_statistics(mean, logvar)
    samples = mean + 0.5 * torch.randn(50_000, 8, generator=g)
    z = module.standardize(samples)
    assert z.mean().abs().item() < 0.02 and z.std().item() == pytest.approx(1.0, abs=0.02)
    torch.testing.assert_close(module.unstandardize(z), samples)


def test_ema_warms_up_and_tracks_the_weights():
    net = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = ExponentialMovingAverage(net, decay=0.999)
    with torch.no_grad():
        net.weight.fill_(1.0)
    for _ in range(1000):
        ema.update(net)
    # with warm-up the initial 0 is forgotten: prod_n d_n = prod (9 / (10 + n)) ~ 0
    assert ema.shadow.weight.item() == pytest.approx(1.0, abs=1e-6)
    assert ema.n_updates.item() == 1000
    target = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(target)
    assert target.weight.item() == ema.shadow.weight.item()


def test_dispersions_get_their_own_learning_rate(model_and_batch):
    model, _ = model_and_batch
    plan = GraphVAETrainingPlan(model.module, lr=2e-3, dispersion_lr_factor=5.0)
    optimizer = plan.configure_optimizers()
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    log_theta = model.module.decoder.log_theta
    assert groups[id(log_theta)]["lr"] == pytest.approx(1e-2)
    assert groups[id(log_theta)]["weight_decay"] == 0.0
    others = [p for p in model.module.decoder.parameters() if p is not log_theta]
    assert all(groups[id(p)]["lr"] == pytest.approx(2e-3) for p in others)
    n_trainable = len([*model.module.encoder.parameters(), *model.module.decoder.parameters()])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_trainable
    with pytest.raises(ValueError, match="dispersion_lr_factor"):
        GraphVAETrainingPlan(model.module, dispersion_lr_factor=0.0)


def test_adam_is_fused_where_torch_has_the_kernel_and_steps_as_the_plain_one():
    from scldiff.train._plan_base import fused_adam_kwargs

    assert fused_adam_kwargs([torch.nn.Parameter(torch.zeros(3)), None]) == {"fused": True}
    assert fused_adam_kwargs([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]) == {}
    weights = [torch.nn.Parameter(torch.tensor([1.0, -2.0])) for _ in range(2)]
    for w in weights:
        w.grad = torch.tensor([0.5, 0.25])
    torch.optim.Adam([weights[0]], lr=0.1, **fused_adam_kwargs([weights[0]])).step()
    torch.optim.Adam([weights[1]], lr=0.1).step()
    torch.testing.assert_close(weights[0], weights[1])


class _Oracle(torch.nn.Module):
    """A ScoreNet stand-in that outputs the exact noise or velocity of ``z_t`` for latents
    ``z0`` known in advance (one row each)."""

    def __init__(self, schedule, z0, output):
        super().__init__()
        self.schedule, self.z0, self.output = schedule, z0, output

    def forward(self, zt, t, labels):
        alpha = self.schedule.alpha(t).view(-1, 1)
        sigma = self.schedule.sigma(t).view(-1, 1)
        eps = (zt - alpha * self.z0) / sigma
        return eps if self.output == "epsilon" else alpha * eps - sigma * self.z0


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_diffusion_loss_is_zero_exactly_at_its_prediction_target(prediction):
    from scldiff.module import LapDDPMModule

    module = LapDDPMModule(n_input=10, n_categories=[2], n_continuous=0, n_lpe=0, n_latent=4,
                           prediction=prediction)
    g = torch.Generator().manual_seed(0)
    z0 = 2.0 + 3.0 * torch.randn(4000, 4, generator=g)  # far from N(0, 1): v != eps
    logvar = torch.full_like(z0, -80.0)  # q(z|x) is a point mass, so z_0 is known
    labels = torch.zeros(4000, 1)
    losses = {}
    for output in ("v", "epsilon"):
        module.score_net = _Oracle(module.schedule, z0, output)
        losses[output] = module.diffusion_loss(z0, logvar, labels).item()
    other = "epsilon" if prediction == "v" else "v"
    assert losses[prediction] < 1e-8
    assert losses[other] > 0.5


def test_velocity_prediction_gives_samplers_the_exact_noise():
    from scldiff.module import LapDDPMModule

    module = LapDDPMModule(n_input=10, n_categories=[2], n_continuous=0, n_lpe=0, n_latent=4,
                           prediction="v")
    g = torch.Generator().manual_seed(1)
    z0 = 2.0 + 3.0 * torch.randn(500, 4, generator=g)
    eps = torch.randn(500, 4, generator=g)
    module.score_net = _Oracle(module.schedule, z0, "v")
    for t in (0.001, 0.3, 0.9, 1.0):
        times = torch.full((500,), t)
        zt = module.schedule.add_noise(z0, eps, times)
        torch.testing.assert_close(module.predict_noise(zt, times, None), eps,
                                   atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="prediction must be one of"):
        LapDDPMModule(n_input=10, n_categories=[2], n_continuous=0, n_lpe=0, prediction="x0")


def test_trained_velocity_scorenet_samples_a_gaussian_with_its_variance():
    """End to end: the loss, the network and the conversion to noise agree, so a ScoreNet
    trained on N(0, diag(s^2)) samples it back with the probability-flow ODE and the SDE.
    (Trained the same way to predict the noise, this network's ODE samples had 1.3 times
    the variances: the high-noise amplification that the velocity removes.)"""
    from scldiff.diffusion import sample_ode, sample_sde
    from scldiff.module import LapDDPMModule

    torch.manual_seed(0)
    module = LapDDPMModule(n_input=10, n_categories=[], n_continuous=0, n_lpe=0, n_latent=2,
                           prediction="v", score_hidden=64, score_blocks=2)
    scale = torch.tensor([0.5, 1.5])  # the standardised data: variances 0.25 and 2.25
    optimizer = torch.optim.Adam(module.score_net.parameters(), lr=2e-3)
    labels = torch.zeros(1024, 0)
    for _ in range(1500):
        z0 = scale * torch.randn(1024, 2)
        loss = module.diffusion_loss(z0, torch.full_like(z0, -80.0), labels, p_uncond=0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    labels = torch.zeros(4000, 0)
    for sampler, steps in ((sample_ode, 30), (sample_sde, 300)):
        z = sampler(lambda z, t: module.predict_noise(z, t, labels),
                    torch.randn(4000, 2, generator=torch.Generator().manual_seed(2)),
                    module.schedule, steps, generator=torch.Generator().manual_seed(3))
        ratio = z.var(0) / scale**2
        assert ((ratio > 0.85) & (ratio < 1.15)).all(), (sampler, ratio)


def test_default_stage_lengths_are_counted_in_optimisation_steps():
    from scldiff.model._training import STAGE_A_STEPS, STAGE_B_STEPS, epochs_for_steps

    assert (STAGE_A_STEPS, STAGE_B_STEPS) == (2_000, 4_000)
    # PBMC3K's benchmark training cells: 2,110 cells, 17 minibatches of 128 per epoch
    assert epochs_for_steps(STAGE_A_STEPS, 2_110, 128) == 118
    # Zheng 2017's: 3,099 cells, 25 minibatches
    assert epochs_for_steps(STAGE_A_STEPS, 3_099, 128) == 80
    # at least one epoch, however large the data
    assert epochs_for_steps(STAGE_A_STEPS, 10_000_000, 128) == 1


def test_training_leaves_torch_global_generator_after_its_one_draw(model_and_batch):
    # a run's seed is one draw from the global generator; the steps' own seeds do not leak
    # into it (a library never changes process-wide state behind the user's back)
    model, _ = model_and_batch
    fresh = scldiff.LapDDPM(model.adata, n_latent=8, n_hidden=32)
    torch.manual_seed(5)
    torch.randint(0, 2**31 - 1, ())
    expected = torch.rand(3)
    torch.manual_seed(5)
    fresh.train(max_epochs_vae=1, max_epochs_diffusion=1, enable_progress_bar=False)
    assert torch.equal(torch.rand(3), expected)


def test_a_step_projects_the_inputs_once_with_the_same_result(model_and_batch):
    # the perturbation's pass and the loss's share the nodes' input projection: the same
    # perturbed weights, loss and gradients as when each pass projects its own
    model, batch = model_and_batch
    module = model.module.train()
    plan = GraphVAETrainingPlan(module, epsilon=0.05, mask_fraction=0.2)
    plan.loss_kwargs["kl_weight"] = 1.0
    inputs = module._get_inference_input(batch)
    results = []
    for shared in (False, True):
        torch.manual_seed(0)
        mask = plan._input_mask(batch)
        projection = module.project_nodes(
            inputs["node_crow"], inputs["node_col"], inputs["node_input"], inputs["n_seed"],
            mask)
        # both passes the shared projection, or the loss's pass its own
        weight, _ = plan.adversarial_edge_weight(batch, projection)
        module.zero_grad()
        _, _, out = module({**batch, BATCH_KEYS.EDGE_WEIGHT: weight},
                           inference_kwargs={"input_mask": mask,
                                             "node_projection": projection if shared else None},
                           loss_kwargs={"kl_weight": 1.0})
        out.loss.backward()
        results.append((weight, out.loss.detach(),
                        {n: p.grad.clone() for n, p in module.named_parameters()
                         if p.grad is not None}))
    (w0, l0, g0), (w1, l1, g1) = results
    torch.testing.assert_close(w1, w0, rtol=0, atol=0)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g1.keys() == g0.keys() and "encoder.expression.weight" in g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)
    module.zero_grad()
    module.eval()


def test_a_training_step_projects_the_expression_once(model_and_batch, monkeypatch):
    from lightning.pytorch import Callback

    model, _ = model_and_batch
    fresh = scldiff.LapDDPM(model.adata, n_latent=8, n_hidden=32)
    encoder, calls, steps, inside = fresh.module.encoder, [], [], [False]
    project = encoder.project

    def counted(*args):
        calls.extend([1] if inside[0] else [])
        return project(*args)

    monkeypatch.setattr(encoder, "project", counted)

    class Count(Callback):  # the training steps' calls, not the encoding pass's after them
        def on_train_batch_start(self, trainer, plan, batch, batch_idx):
            inside[0] = True

        def on_train_batch_end(self, trainer, plan, outputs, batch, batch_idx):
            inside[0] = False
            steps.append(plan.stage)

    fresh.train(max_epochs_vae=2, max_epochs_diffusion=0, enable_progress_bar=False,
                callbacks=[Count()], check_val_every_n_epoch=100)
    # the seeds' rows (with gradients) and the other nodes' (without), once per step
    assert len(steps) >= 2 and len(calls) == 2 * len(steps)



def test_a_default_train_prints_its_progress_bar_and_nothing_else(capfd):
    import scldiff

    scvi.settings.seed = 0
    adata = small_pbmc(n_cells=120, n_genes=80)
    scldiff.LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=5, n_lpe=2)
    model = scldiff.LapDDPM(adata, n_latent=4, n_hidden=16, score_hidden=16, score_blocks=1)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.train(max_epochs=2)
        model.generate(n_samples=5, seed=0)
    out, err = capfd.readouterr()
    ours = ("Training", "Epoch", "Stage A", "Encoding cells", "Stage B", "Generating cells")
    lines = [line for line in (out + err).replace("\r", "\n").splitlines() if line.strip()]
    assert lines and not [line for line in lines if not line.startswith(ours)]
    assert not [w for w in caught if "lightning" in w.filename], caught
    assert logging.getLogger("lightning.pytorch").level == logging.INFO  # restored


def test_attribute_dropout_is_independent_per_cell_and_per_attribute():
    from scldiff.module import drop_attributes

    rows = torch.zeros(200_000, 3)
    null = torch.isnan(drop_attributes(rows, 0.2, torch.Generator().manual_seed(0)))
    assert ((null.float().mean(0) - 0.2).abs() < 0.005).all()  # each attribute at its rate
    # independent coins: P(two null) = 0.2^2, P(all three) = 0.2^3
    assert null[:, :2].all(1).float().mean().item() == pytest.approx(0.04, abs=0.002)
    assert null.all(1).float().mean().item() == pytest.approx(0.008, abs=0.001)
    assert drop_attributes(rows, 0.0) is rows
