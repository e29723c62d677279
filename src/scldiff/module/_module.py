"""LapDDPM module: pure torch on ``dict[str, Tensor]`` (no AnnData here)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from scvi.module.base import BaseModuleClass, LossOutput
from torch import Tensor

from .._autocast import autocast_dtype
from .._constants import BATCH_KEYS
from .._matrix import stack_rows
from ..diffusion import DEFAULT_STEPS, SAMPLERS, ClassifierFreeGuidance, VPSchedule
from ._decoder import (
    CountDecoder,
    Dispersion,
    Likelihood,
    sample_counts,
    sparse_log_likelihood,
)
from ._encoder import GraphEncoder
from ._scorenet import ScoreNet

_ENCODER_INPUTS = (
    BATCH_KEYS.NODE_CROW, BATCH_KEYS.NODE_COL, BATCH_KEYS.NODE_INPUT, BATCH_KEYS.LPE,
    BATCH_KEYS.EDGE_INDEX, BATCH_KEYS.EDGE_WEIGHT, BATCH_KEYS.DEGREE_OUTSIDE,
)


# what the ScoreNet's output is: the noise, or the velocity v = alpha * noise - sigma * z_0
PREDICTIONS = ("epsilon", "v")

# log-variance of a coordinate known exactly (the observed log library size)
_KNOWN_LOGVAR = -30.0
# cells per decoder-and-sampling chunk on a CPU (decode_counts)
_COUNT_CHUNK = 256
# at most this many threads decode and draw chunks at once on a CPU (each holds a chunk's
# dense parameters)
_MAX_DECODE_WORKERS = 8


class LatentLibrary:
    r"""Library sizes given the latent: :math:`\log \ell = a_c + b^\top z + r`, with the
    residual :math:`r` drawn from label :math:`c`'s empirical residuals, clipped to the
    training cells' range.

    Fitted by least squares on the training cells' posteriors and log library sizes
    (:meth:`fit`): one intercept :math:`a_c` per label, one slope vector :math:`b` shared by
    all (the within-label regression), and per label the quantile function of the
    residuals at evenly spaced probabilities, from which draws are interpolated linearly
    (log library sizes are skewed, so a normal residual would put the median library off;
    the label-only library model learned that the same way). A cell's sequencing depth
    follows its state inside a cell type (on Zheng 2017 the posterior means explain 44% of
    the within-label variance of the log library size), and drawing it independently of
    the latent loses that coupling.

    Parameters
    ----------
    coef
        ``(n_latent,)`` slopes :math:`b`.
    intercept
        ``(n_labels,)`` intercepts :math:`a_c`.
    residual_quantiles
        ``(n_labels, n_quantiles)`` non-decreasing residual quantiles of each label, at
        probabilities ``linspace(0, 1, n_quantiles)``.
    log_range
        ``(2,)`` smallest and largest training log library size.
    """

    def __init__(self, coef: Tensor, intercept: Tensor, residual_quantiles: Tensor,
                 log_range: Tensor):
        self.coef, self.intercept = coef, intercept
        self.residual_quantiles, self.log_range = residual_quantiles, log_range

    @classmethod
    @torch.no_grad()
    def fit(cls, z: Tensor, library: Tensor, labels: Tensor, n_labels: int,
            z_var: Tensor | None = None, n_quantiles: int = 101,
            n_points: int = 8) -> LatentLibrary:
        r"""Least-squares fit on latents ``z`` (``(n, n_latent)``), ``library`` (``(n,)``,
        positive) and label codes ``labels`` (``(n,)``), in float64.

        The slopes come from the within-label centred data (the fit with one intercept
        per label). With ``z_var``, the posterior variances of ``z`` (the posterior means),
        the fit is the one to latents drawn from the cells' posteriors, in expectation:
        :math:`\sum_i \operatorname{diag}(v_i)` joins the normal equations, so that
        latents drawn like the diffusion's training data (:meth:`LapDDPMModule.
        diffusion_loss`) get :math:`E[\log \ell \mid z]`. The residuals are then those of
        such draws: each cell's :math:`e_i = y_i - a_c - b^\top z_i` minus :math:`s_i
        \xi_k` with :math:`s_i^2 = b^\top \operatorname{diag}(v_i)\, b` and
        :math:`\xi_k` the ``n_points`` standard normal quantiles at :math:`(k -
        \tfrac12)/n`, so the fit is deterministic. A label with fewer than two cells gets
        the residual quantiles of all cells, a label without cells also the intercept of
        all cells.
        """
        z = z.detach().cpu().double()
        y = library.detach().cpu().double().reshape(-1).log()
        labels = labels.detach().cpu().reshape(-1).long()
        counts = torch.bincount(labels, minlength=n_labels).to(z.dtype)
        present = counts > 0
        z_mean = torch.zeros(n_labels, z.shape[1], dtype=z.dtype).index_add_(0, labels, z)
        y_mean = torch.zeros(n_labels, dtype=z.dtype).index_add_(0, labels, y)
        z_mean[present] /= counts[present, None]
        y_mean[present] /= counts[present]
        zc, yc = z - z_mean[labels], y - y_mean[labels]
        gram = zc.T @ zc
        if z_var is not None:
            z_var = z_var.detach().cpu().double()
            gram = gram + torch.diag(z_var.sum(0))
        coef = torch.linalg.lstsq(gram, (zc.T @ yc)[:, None], driver="gelsd").solution[:, 0]
        residual = (yc - zc @ coef)[:, None]
        if z_var is not None:
            probabilities = (torch.arange(n_points, dtype=z.dtype) + 0.5) / n_points
            normal = torch.distributions.Normal(0.0, 1.0).icdf(probabilities).to(z.dtype)
            residual = residual - (z_var @ coef**2).sqrt()[:, None] * normal[None, :]
        # numpy: torch.quantile refuses inputs of more than 2**24 values (an atlas's)
        grid = np.linspace(0.0, 1.0, n_quantiles)
        residual, codes = residual.numpy(), labels.numpy()
        quantiles = np.tile(np.quantile(residual, grid), (n_labels, 1))
        for code in np.flatnonzero(counts.numpy() > 1):
            quantiles[code] = np.quantile(residual[codes == code], grid)
        quantiles = torch.from_numpy(quantiles)
        intercept = y_mean - z_mean @ coef
        intercept[~present] = y.mean() - z.mean(0) @ coef
        log_range = torch.stack([y.min(), y.max()])
        return cls(coef.float(), intercept.float(), quantiles.float(), log_range.float())

    def to(self, device: torch.device | str) -> LatentLibrary:
        return LatentLibrary(*(t.to(device) for t in (
            self.coef, self.intercept, self.residual_quantiles, self.log_range)))

    def sample(self, z: Tensor, labels: Tensor, generator: torch.Generator | None = None
               ) -> Tensor:
        """One library size per latent, ``(n,)`` float32, from ``generator``: the residual by
        inverse transform of the label's interpolated residual quantiles."""
        labels = labels.reshape(-1).long()
        rows = self.residual_quantiles[labels]
        position = torch.rand(labels.shape, generator=generator, device=rows.device) * (
            rows.shape[1] - 1)
        index = position.long().clamp_max(rows.shape[1] - 2)
        below = rows.gather(1, index[:, None])[:, 0]
        above = rows.gather(1, index[:, None] + 1)[:, 0]
        residual = below + (position - index) * (above - below)
        log_library = self.intercept[labels] + z.float() @ self.coef + residual
        return log_library.clamp(*self.log_range.tolist()).exp()


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    r"""KL(N(mean, exp(logvar)) || N(0, I)) per row.

    :math:`\tfrac12\sum(\mu^2 + \sigma^2 - 1 - \log\sigma^2)` (paper 001, :math:`L_{KL}`).
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


class LapDDPMModule(BaseModuleClass):
    r"""Graph VAE (encoder + count decoder) and a conditional latent diffusion model.

    Parameters
    ----------
    n_input
        Number of genes.
    n_labels
        Number of labels (1 for an unconditional model).
    n_lpe
        Number of Laplacian positional encodings given to the encoder.
    lpe_scale
        Factor applied to the (unit-norm) encodings, ``sqrt(n_cells)``, so entries are O(1).
    n_latent
        Latent dimension.
    n_hidden
        Hidden width of encoder and decoder.
    cheb_k
        Chebyshev filter size of each graph layer.
    n_cheb_layers
        Number of graph layers.
    likelihood
        ``"nb"``, ``"zinb"``, ``"hurdle"`` or ``"poisson"``.
    dropout_rate
        Dropout in the encoder.
    neighbour_gradients
        Back-propagate through the input projection of the neighbour cells too (see
        :class:`~scldiff.module.GraphEncoder`).
    score_hidden, score_blocks
        ScoreNet width and depth.
    diffuse_library
        Diffuse the log library size jointly with the latent (one extra coordinate), so
        generated library sizes depend on the cell state, not only on the label.
    beta_min, beta_max, t_min
        VP-SDE schedule (:class:`~scldiff.diffusion.VPSchedule`).
    dispersion
        ``"gene"``: one inverse dispersion per gene; ``"gene-label"``: one per gene and
        label (:class:`~scldiff.module.CountDecoder`).
    decoder_labels
        Give the decoder the cell's label beside its latent (``label_covariate`` of
        :class:`~scldiff.module.CountDecoder`).
    encoder_labels
        Give the encoder the encoded cell's label (``n_labels`` of
        :class:`~scldiff.module.GraphEncoder`), as a conditional VAE's encoder.
    prediction
        What the ScoreNet is trained to output (:meth:`diffusion_loss`): ``"v"`` (default),
        the velocity :math:`v = \alpha_t \epsilon - \sigma_t z_0` (Salimans & Ho, 2022), or
        ``"epsilon"``, the noise. Samplers get the noise either way
        (:meth:`predict_noise`). At high noise (:math:`\alpha_t \to 0`) the clean latent
        implied by a noise prediction, :math:`(z_t - \sigma_t\hat\epsilon)/\alpha_t`,
        multiplies the network's error by :math:`\sigma_t/\alpha_t` (150 at
        :math:`t = 1`); a velocity prediction bounds it.
    """

    def __init__(
        self,
        n_input: int,
        n_labels: int,
        n_lpe: int,
        lpe_scale: float = 1.0,
        n_latent: int = 16,
        n_hidden: int = 128,
        cheb_k: int = 2,
        n_cheb_layers: int = 1,
        likelihood: Likelihood = "nb",
        dropout_rate: float = 0.1,
        neighbour_gradients: bool = False,
        score_hidden: int = 128,
        score_blocks: int = 3,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_min: float = 1e-3,
        diffuse_library: bool = False,
        dispersion: Dispersion = "gene",
        decoder_labels: bool = False,
        encoder_labels: bool = False,
        prediction: Literal["v", "epsilon"] = "v",
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
        self.prediction = prediction
        self.n_latent = n_latent
        self.diffuse_library = diffuse_library
        self.n_diffusion = n_latent + int(diffuse_library)
        self.likelihood = likelihood
        self.encoder = GraphEncoder(n_input, n_lpe, n_latent, n_hidden, cheb_k, n_cheb_layers,
                                    dropout_rate, neighbour_gradients,
                                    n_labels=n_labels if encoder_labels else 0)
        self.decoder = CountDecoder(n_latent, n_input, n_hidden, likelihood=likelihood,
                                    dispersion=dispersion, n_labels=n_labels,
                                    label_covariate=decoder_labels)
        self.score_net = ScoreNet(self.n_diffusion, n_labels, score_hidden, score_blocks)
        self.schedule = VPSchedule(beta_min, beta_max, t_min)
        self.register_buffer("lpe_scale", torch.tensor(float(lpe_scale)))
        # Standardisation of the aggregate posterior, set between the two training stages.
        # (with diffuse_library, the last coordinate is the log library size)
        self.register_buffer("latent_mean", torch.zeros(self.n_diffusion))
        self.register_buffer("latent_std", torch.ones(self.n_diffusion))
        # range of the training cells' log library sizes; diffused ones are clipped to it
        self.register_buffer("log_library_range", torch.tensor([-torch.inf, torch.inf]))

    # ------------------------------------------------------------------ VAE (stage A)
    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict:
        inputs = {key: tensors[key] for key in _ENCODER_INPUTS}
        inputs["n_seed"] = tensors[BATCH_KEYS.LABELS].shape[0]
        if BATCH_KEYS.SEED_COUNTS in tensors:
            # the seed rows' stored entries, known on the host from the counts' length
            inputs["n_seed_entries"] = tensors[BATCH_KEYS.SEED_COUNTS].shape[0]
        inputs["n_seed_edges"] = tensors.get(BATCH_KEYS.SEED_EDGES)
        if self.encoder.label_embedding is not None:
            inputs["labels"] = tensors[BATCH_KEYS.LABELS]
        return inputs

    def inference(
        self,
        node_crow: Tensor,
        node_col: Tensor,
        node_input: Tensor,
        lpe: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor,
        degree_outside: Tensor,
        n_seed: int,
        input_mask: Tensor | None = None,
        use_mean: bool = False,
        labels: Tensor | None = None,
        n_seed_entries: int | None = None,
        n_seed_edges: int | None = None,
        node_projection: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Posterior q(z | x, graph) of the seed cells (the first ``n_seed`` nodes).

        ``node_input`` holds the log-normalised expression of every node (CSR values).
        ``input_mask`` (one 0/1 value per stored entry) zeroes masked genes in the encoder's
        input only (paper 001's input gene masking); the likelihood sees all counts.
        ``labels``: the seed cells' label codes, read by a label-aware encoder
        (``encoder_labels``). ``n_seed_entries``: the seed rows' stored entries,
        ``node_crow[n_seed]``, and ``n_seed_edges``, the edges into the seeds (the first
        ones), where the caller knows them without reading the device (a GPU's).
        ``node_projection``: the nodes' input projection, computed already by
        :meth:`project_nodes` with the same ``input_mask`` (the expression and the mask
        are then not read again).
        """
        if node_projection is None:
            node_projection = self.project_nodes(node_crow, node_col, node_input, n_seed,
                                                 input_mask, n_seed_entries)
        # through the encoder's forward, so that hooks on it see every pass
        mean, logvar = self.encoder(
            node_crow, node_col, node_input, lpe * self.lpe_scale, edge_index, edge_weight,
            degree_outside, n_seed=n_seed, labels=labels, n_seed_edges=n_seed_edges,
            projection=node_projection,
        )
        mean, logvar = mean[:n_seed], logvar[:n_seed]
        z = mean if use_mean else mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        return {"qz_mean": mean, "qz_logvar": logvar, "z": z}

    def project_nodes(self, node_crow: Tensor, node_col: Tensor, node_input: Tensor,
                      n_seed: int, input_mask: Tensor | None = None,
                      n_seed_entries: int | None = None) -> Tensor:
        """The input projection of a batch's nodes that :meth:`inference` starts from
        (:meth:`GraphEncoder.project_nodes`), with ``input_mask`` applied. A training step
        computes it once for its two passes (the perturbation's and the loss's): it does
        not depend on the edge weights."""
        value = node_input if input_mask is None else node_input * input_mask
        return self.encoder.project_nodes(node_crow, node_col, value, n_seed, n_seed_entries)

    def project_expression(self, node_crow: Tensor, node_col: Tensor, node_input: Tensor
                           ) -> Tensor:
        """The encoder's input projection of each cell (``(n_cells, n_hidden)``), which
        :meth:`inference_projected` takes in place of the expression."""
        return self.encoder.project(node_crow, node_col, node_input)

    def inference_projected(
        self,
        node_projection: Tensor,
        lpe: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor,
        degree_outside: Tensor,
        n_seed: int,
        labels: Tensor | None = None,
        n_seed_edges: int | None = None,
    ) -> dict[str, Tensor]:
        """Posterior mean and log-variance of the seed cells from the nodes' input
        projections (:meth:`project_expression`): what :meth:`inference` computes with
        ``use_mean=True`` and no input mask."""
        mean, logvar = self.encoder.forward_projected(
            node_projection, lpe * self.lpe_scale, edge_index, edge_weight, degree_outside,
            n_seed, labels, n_seed_edges)
        mean, logvar = mean[:n_seed], logvar[:n_seed]
        return {"qz_mean": mean, "qz_logvar": logvar, "z": mean}

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        return {"z": inference_outputs["z"], "library": tensors[BATCH_KEYS.SEED_LIBRARY][:, None],
                "labels": tensors[BATCH_KEYS.LABELS]}

    def generative(self, z: Tensor, library: Tensor, labels: Tensor | None = None,
                   distribution: bool = True) -> dict:
        """Likelihood parameters; ``px`` is the count distribution (scvi-tools objects).
        ``labels`` (codes) are needed with ``dispersion="gene-label"`` or
        ``decoder_labels``. ``distribution=False``, as training passes it, gives what
        :meth:`loss` reads alone: no ``px``, and the decoder's logits ``scale_logits`` in
        place of ``params["log_scale"]`` and ``params["scale"]``, dense ``(cells, genes)``
        tensors (:meth:`CountDecoder.forward` with ``normalized=False``)."""
        params = self.decoder(z, labels, normalized=distribution)
        out = {"params": params, "library": library}
        if distribution:
            out["px"] = self.decoder.distribution(params, library)
        return out

    def loss(
        self,
        tensors: dict[str, Tensor],
        inference_outputs: dict[str, Tensor],
        generative_outputs: dict,
        kl_weight: float | Tensor = 1.0,
        rec_weight: float = 1.0,
    ) -> LossOutput:
        """Stage A: ``rec_weight * -log p(x|z) + kl_weight * KL(q(z|x) || N(0, I))``.

        The seed cells' counts are the first rows of the batch's CSR node matrix; the
        likelihood is evaluated sparsely (:func:`~scldiff.module.sparse_log_likelihood`).
        """
        n_seed = tensors[BATCH_KEYS.LABELS].shape[0]
        crow = tensors[BATCH_KEYS.NODE_CROW][: n_seed + 1]
        # crow[-1], known on the host from the counts' length (no device synchronisation)
        nnz = tensors[BATCH_KEYS.SEED_COUNTS].shape[0]
        reconstruction = -sparse_log_likelihood(
            self.likelihood, generative_outputs["params"], generative_outputs["library"], crow,
            tensors[BATCH_KEYS.NODE_COL][:nnz], tensors[BATCH_KEYS.SEED_COUNTS],
        )
        kl = gaussian_kl(inference_outputs["qz_mean"], inference_outputs["qz_logvar"])
        loss = (rec_weight * reconstruction + kl_weight * kl).mean()
        return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local=kl)

    # ------------------------------------------------------------ diffusion (stage B)
    def standardize(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def unstandardize(self, z: Tensor) -> Tensor:
        return z * self.latent_std + self.latent_mean

    def diffusion_inputs(self, qz_mean: Tensor, qz_logvar: Tensor, library: Tensor
                         ) -> tuple[Tensor, Tensor]:
        """Posterior parameters of what is diffused: the latent, and with
        ``diffuse_library`` the log library size appended as an exactly known coordinate.

        Also records the range of the log library sizes, to which generated ones are
        clipped (the diffusion's tails must not produce a library no training cell had).
        """
        if not self.diffuse_library:
            return qz_mean, qz_logvar
        log_library = library.to(qz_mean).log().view(-1, 1)
        known = torch.full_like(log_library, _KNOWN_LOGVAR)
        return torch.cat([qz_mean, log_library], 1), torch.cat([qz_logvar, known], 1)

    @torch.no_grad()
    def set_latent_statistics(self, qz_mean: Tensor, qz_logvar: Tensor) -> None:
        """Mean and std of the aggregate posterior (a mixture of the cells' Gaussians)."""
        mean = qz_mean.mean(0)
        var = qz_logvar.exp().mean(0) + qz_mean.var(0, unbiased=False)
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(var.sqrt().clamp_min(1e-6))
        if self.diffuse_library:
            # generated log library sizes are clipped to the training cells' range: the
            # diffusion's tails must not produce a library size no training cell had
            log_library = qz_mean[:, self.n_latent]
            self.log_library_range.copy_(torch.stack([log_library.min(), log_library.max()]))

    def diffusion_loss(
        self, qz_mean: Tensor, qz_logvar: Tensor, labels: Tensor, p_uncond: float = 0.1
    ) -> Tensor:
        r"""Denoising MSE on z_0 ~ q(z|x), standardised (paper 001, :math:`L_{diff}`): of the
        noise, or with ``prediction="v"`` of :math:`v = \alpha_t\epsilon - \sigma_t z_0`,
        whose loss is the noise's weighted by :math:`1/\alpha_t^2` (and the clean latent's
        by :math:`1 + \mathrm{SNR}_t`, Salimans & Ho, 2022).

        Each cell's label is replaced by the null token with probability ``p_uncond``,
        independently per cell, so one network learns conditional and unconditional scores.
        """
        z0 = qz_mean + torch.randn_like(qz_mean) * (0.5 * qz_logvar).exp()
        z0 = self.standardize(z0)
        t = self.schedule.sample_time(z0.shape[0], device=z0.device)
        noise = torch.randn_like(z0)
        zt = self.schedule.add_noise(z0, noise, t)
        labels = labels.view(-1).long()
        drop = torch.rand(labels.shape, device=labels.device) < p_uncond
        labels = torch.where(drop, torch.full_like(labels, self.score_net.null_label), labels)
        target = self.schedule.velocity(z0, noise, t) if self.prediction == "v" else noise
        return torch.nn.functional.mse_loss(self.score_net(zt, t, labels), target)

    def predict_noise(self, z: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        r"""The ScoreNet's noise prediction :math:`\hat\epsilon(z_t, t, c)`, whatever it
        was trained to output: with ``prediction="v"``,
        :math:`\hat\epsilon = \sigma_t z_t + \alpha_t \hat v`
        (:meth:`~scldiff.diffusion.VPSchedule.noise_from_velocity`)."""
        out = self.score_net(z, t, labels)
        if self.prediction == "epsilon":
            return out
        return self.schedule.noise_from_velocity(z, out, t)

    # --------------------------------------------------------------------- generation
    @torch.no_grad()
    def sample_latents(
        self,
        labels: Tensor,
        guidance_scale: float = 1.0,
        sampler: str = "ode",
        n_steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> Tensor:
        """Guided reverse diffusion from N(0, I) to latents of the given labels
        (``guidance_interval``: see :class:`~scldiff.diffusion.ClassifierFreeGuidance`).

        Returns ``(n, n_latent)`` latents, or ``(n, n_latent + 1)`` with the log library
        size last when the library size is diffused.
        """
        device = self.latent_mean.device
        labels = labels.to(device).long()
        z = torch.randn(labels.shape[0], self.n_diffusion, generator=generator, device=device)
        eps_fn = ClassifierFreeGuidance(self.predict_noise, labels,
                                        self.score_net.null_label, guidance_scale,
                                        interval=guidance_interval)
        steps = n_steps or DEFAULT_STEPS[sampler]
        return self.unstandardize(SAMPLERS[sampler](eps_fn, z, self.schedule, steps,
                                                    generator=generator))

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        library: Tensor | None,
        rng: np.random.Generator,
        guidance_scale: float = 1.0,
        sampler: str = "ode",
        n_steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> sp.csr_matrix:
        """Counts for cells of the given labels (CSR): latents, decoder, likelihood.

        ``library`` gives the cells' library sizes (the expected total counts); it is
        ignored (may be ``None``) when the library size is diffused with the latent, which
        then supplies it. ``generator`` draws the latents and, on a GPU, the counts;
        ``rng`` draws the counts on a CPU (:meth:`decode_counts`).
        """
        return self._stack(self._sample_blocks(labels, library, rng, guidance_scale, sampler,
                                               n_steps, generator, guidance_interval))

    @torch.no_grad()
    def _sample_blocks(self, labels: Tensor, library: Tensor | LatentLibrary | None,
                       rng: np.random.Generator, guidance_scale: float = 1.0,
                       sampler: str = "ode", n_steps: int | None = None,
                       generator: torch.Generator | None = None,
                       guidance_interval: tuple[float, float] | None = None,
                       ) -> list[sp.csr_matrix]:
        """:meth:`sample` as row blocks of counts, to be stacked once by the caller.
        ``library``: the cells' library sizes, or a :class:`LatentLibrary` that draws them
        given the sampled latents."""
        z = self.sample_latents(labels, guidance_scale, sampler, n_steps, generator,
                                guidance_interval)
        if not bool(torch.isfinite(z).all()):
            raise FloatingPointError(
                "The sampled latents are not finite (NaN or infinite): lower "
                f"guidance_scale (now {guidance_scale}), or check the model's weights.")
        if self.diffuse_library:
            low, high = self.log_library_range.tolist()
            z, library = z[:, : self.n_latent], z[:, self.n_latent].clamp(low, high).exp()
        elif isinstance(library, LatentLibrary):
            library = library.sample(z, labels.to(z.device), generator)
        elif library is None:
            raise ValueError("library sizes are required when they are not diffused.")
        return self._decode_blocks(z, library, rng, generator=generator, labels=labels)

    @torch.no_grad()
    def decode_counts(self, z: Tensor, library: Tensor, rng: np.random.Generator,
                      chunk_size: int | None = None,
                      generator: torch.Generator | None = None,
                      labels: Tensor | None = None) -> sp.csr_matrix:
        """Counts (CSR) of cells with latents ``z`` and library sizes ``library``
        (``labels``: the cells' label codes, needed with ``dispersion="gene-label"`` or
        ``decoder_labels``).

        On a CPU, the decoder (:meth:`CountDecoder.sampling_params`) and the count draws
        (:func:`sample_counts`) run on ``chunk_size`` cells at a time (default 256), each
        chunk in one of ``torch.get_num_threads()`` worker threads (at most 8), torch
        itself on one thread meanwhile. The draws of each chunk come from their own
        generator, seeded from ``rng`` in chunk order, so the counts do not depend on the
        number of threads. The caller's ``torch.autocast`` carries over into the workers,
        with the output layers' weights cast once for all chunks. For 10,000 PBMC3K cells
        on 2 threads (Intel Xeon VM, ``benchmarks/speed.py``, best of 7): 0.67 s in
        float32 and 0.50 s under bf16 autocast; with the decoder on the calling thread and
        numpy draws on one worker it was 1.54 s in float32 (AMD EPYC VM). Chunks of 128 or
        512 cells were slower than 256.

        With ``z`` on another device (a GPU) and a ``generator`` on that device, the counts
        are drawn there, in torch, from ``generator`` (all cells at once by default), and
        only the CSR arrays of the nonzero counts come back, through pinned memory. Without
        ``generator`` the draws run on the CPU.
        """
        return self._stack(self._decode_blocks(z, library, rng, chunk_size, generator, labels))

    @torch.no_grad()
    def _decode_blocks(self, z: Tensor, library: Tensor, rng: np.random.Generator,
                       chunk_size: int | None = None,
                       generator: torch.Generator | None = None,
                       labels: Tensor | None = None) -> list[sp.csr_matrix]:
        """:meth:`decode_counts` as row blocks (one per chunk), not yet stacked."""
        on_device = z.device.type != "cpu" and generator is not None
        if on_device and generator.device.type != z.device.type:
            raise ValueError(f"generator is on {generator.device}, the latents on {z.device}.")
        if chunk_size is None:
            chunk_size = _COUNT_CHUNK if z.device.type == "cpu" else max(z.shape[0], 1)
        library = library.reshape(-1, 1)
        if labels is not None:
            labels = labels.reshape(-1).to(z.device)
        blocks = []
        if on_device:
            for start in range(0, z.shape[0], chunk_size):
                params = self.decoder.sampling_params(
                    z[start : start + chunk_size],
                    None if labels is None else labels[start : start + chunk_size])
                blocks.append(sample_counts(self.likelihood, params,
                                            library[start : start + chunk_size], generator))
        else:
            blocks = self._decode_blocks_cpu(z, library, rng, chunk_size, labels)
        return blocks

    def _decode_blocks_cpu(self, z: Tensor, library: Tensor, rng: np.random.Generator,
                           chunk_size: int, labels: Tensor | None) -> list[sp.csr_matrix]:
        """:meth:`_decode_blocks` on a CPU: each chunk, decoder and draws, in one of
        ``torch.get_num_threads()`` worker threads (at most 8), with torch itself on one
        thread meanwhile. Each chunk's draws have their own generator, seeded from ``rng``
        in chunk order, so the counts depend neither on timing nor on the thread count.
        The caller's ``torch.autocast`` carries over into the workers."""
        starts = range(0, z.shape[0], chunk_size)
        seeds = rng.integers(0, 2**63, size=len(starts))
        dtype = autocast_dtype("cpu")
        autocast = dtype is not None
        # the output layers' weights, under autocast cast once rather than for each chunk
        weights = self.decoder.output_weights(dtype)

        def chunk(start: int, seed: int) -> sp.csr_matrix:
            end = start + chunk_size
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
                # the logits: the sampler computes the probabilities in its own pass
                params = self.decoder.sampling_params(
                    z[start:end], None if labels is None else labels[start:end], logits=True,
                    weights=weights)
                return sample_counts(self.likelihood, params, library[start:end],
                                     np.random.default_rng(seed))

        threads = torch.get_num_threads()
        workers = min(threads, _MAX_DECODE_WORKERS, len(starts))
        if workers <= 1:
            return [chunk(start, seed) for start, seed in zip(starts, seeds, strict=True)]
        # Torch's own threads would compete with the workers for the cores: a parallel
        # matrix product waits for its slowest thread, which shares a core with a worker
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers) as executor:
                return list(executor.map(chunk, starts, seeds))
        finally:
            torch.set_num_threads(threads)

    def _stack(self, blocks: list[sp.csr_matrix], copies: int = 1
               ) -> sp.csr_matrix | list[sp.csr_matrix]:
        """Row blocks of counts as one CSR matrix (float32), copied once, in
        ``torch.get_num_threads()`` threads; with ``copies > 1`` a list of that many that
        share no memory (:func:`scldiff._matrix.stack_rows`)."""
        out = stack_rows(blocks, self.decoder.scale.out_features, copies,
                         workers=min(torch.get_num_threads(), _MAX_DECODE_WORKERS))
        return out[0] if copies == 1 else out
