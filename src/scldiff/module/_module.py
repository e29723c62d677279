"""LapDDPMModule: the graph VAE and the latent diffusion model, in pure torch (no AnnData)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from scvi.module.base import BaseModuleClass, LossOutput
from torch import Tensor

from ..diffusion import (
    DEFAULT_STEPS,
    SAMPLERS,
    ClassifierFreeGuidance,
    VPSchedule,
    invert_ddim,
)
from ..distributions import CountParams, Likelihood, sparse_log_likelihood
from ..sampling import draw_counts, transport_counts
from ._constants import BATCH_KEYS
from ._decoder import AccessibilityDecoder, CountDecoder
from ._encoder import GraphEncoder
from ._scorenet import ScoreNet, drop_attributes
from ._scorer import RealnessScorer

_ENCODER_INPUTS = (
    BATCH_KEYS.NODE_CROW, BATCH_KEYS.NODE_COL, BATCH_KEYS.NODE_INPUT, BATCH_KEYS.LPE,
    BATCH_KEYS.EDGE_INDEX, BATCH_KEYS.EDGE_WEIGHT, BATCH_KEYS.DEGREE_OUTSIDE,
)
# how a counterfactual reaches the noise level of its strength: fresh noise (SDEdit) or the
# inverted deterministic sampler (dual diffusion implicit bridges)
COUNTERFACTUAL_METHODS = ("noise", "inversion")
# what the ScoreNet's output is: the noise, or the velocity v = alpha * noise - sigma * z_0
PREDICTIONS = ("v", "epsilon")
# cells per decoder-and-sampling chunk on a CPU (decode_counts, counterfactual_counts)
_COUNT_CHUNK = 256
# at most this many threads decode and draw chunks at once on a CPU
_MAX_DECODE_WORKERS = 8


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(\mathcal N(\mu, \sigma^2) \,\|\, \mathcal N(0, I))` per row,
    :math:`\tfrac12\sum(\mu^2 + \sigma^2 - 1 - \log\sigma^2)`."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def _on_cpu(params: CountParams) -> CountParams:
    """``params`` with its tensors on the CPU (float32 at least)."""
    move = lambda t: None if t is None else t.detach().float().cpu()  # noqa: E731
    return CountParams(params.likelihood, move(params.logits), move(params.log_theta),
                       move(params.zi_logits), move(params.logits_bias),
                       move(params.zi_bias))


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of ``torch.autocast`` on this device type in this thread, ``None`` when it
    is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class LapDDPMModule(BaseModuleClass):
    r"""The graph VAE (encoder and count decoder) and the conditional latent diffusion model.

    Parameters
    ----------
    n_input
        Number of genes.
    n_categories
        Number of categories of each categorical attribute (labels first, then categorical
        covariates); empty for a model without them.
    n_continuous
        Number of continuous covariates.
    n_lpe
        Number of Laplacian positional encodings given to the encoder.
    n_position
        Width of a spot's position the diffusion is conditioned on (its spatial Laplacian
        positional encoding, scaled by ``lpe_scale``; 0: not spatial), a block of columns
        after the attributes in the attribute rows (:class:`ScoreNet`).
    n_chromatin
        Width of a cell's chromatin the diffusion is conditioned on (its standardised ATAC
        LSI embedding; 0: no ATAC), the block after the position.
    n_peaks
        Peaks of an accessibility decoder from the latent (:class:`AccessibilityDecoder`,
        trained after stage A by :func:`~scldiff.train.fit_accessibility`; 0: none).
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
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    dropout_rate
        Dropout in the encoder.
    score_hidden, score_blocks
        ScoreNet width and depth.
    beta_min, beta_max, t_min
        VP-SDE schedule (:class:`~scldiff.diffusion.VPSchedule`).
    decoder_covariates
        Give the decoder the cell's categorical attributes beside its latent
        (:class:`CountDecoder`).
    prediction
        What the ScoreNet is trained to output (:meth:`diffusion_loss`): ``"v"``, the
        velocity :math:`v = \alpha_t \epsilon - \sigma_t z_0` (Salimans & Ho, 2022), or
        ``"epsilon"``, the noise. Samplers get the noise either way
        (:meth:`predict_noise`). At high noise the clean latent implied by a noise
        prediction, :math:`(z_t - \sigma_t\hat\epsilon)/\alpha_t`, multiplies the network's
        error by :math:`\sigma_t/\alpha_t` (150 at :math:`t = 1`); a velocity prediction
        bounds it.
    """

    def __init__(
        self,
        n_input: int,
        n_categories: Sequence[int],
        n_continuous: int,
        n_lpe: int,
        lpe_scale: float = 1.0,
        n_latent: int = 16,
        n_hidden: int = 128,
        cheb_k: int = 2,
        n_cheb_layers: int = 1,
        likelihood: Likelihood = "zinb",
        dropout_rate: float = 0.1,
        score_hidden: int = 128,
        score_blocks: int = 3,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_min: float = 1e-3,
        decoder_covariates: bool = False,
        prediction: Literal["v", "epsilon"] = "v",
        n_position: int = 0,
        n_chromatin: int = 0,
        n_peaks: int = 0,
    ):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
        self.prediction = prediction
        self.n_latent = n_latent
        self.likelihood = likelihood
        self.encoder = GraphEncoder(n_input, n_lpe, n_latent, n_hidden, cheb_k, n_cheb_layers,
                                    dropout_rate)
        self.n_categorical = len(n_categories)
        self.decoder = CountDecoder(n_latent, n_input, n_hidden, likelihood=likelihood,
                                    n_categories=n_categories if decoder_covariates else ())
        self.n_position, self.n_chromatin = int(n_position), int(n_chromatin)
        # the widths of the blocks after the attributes: the position, the chromatin
        self.block_widths = [w for w in (self.n_position, self.n_chromatin) if w]
        self.score_net = ScoreNet(n_latent, n_categories, n_continuous,
                                  blocks=self.block_widths,
                                  n_hidden=score_hidden, n_blocks=score_blocks)
        self.accessibility = AccessibilityDecoder(n_latent, n_peaks, n_hidden) \
            if n_peaks else None
        # trained after stage B (:func:`~scldiff.train.fit_scorer`)
        self.scorer = RealnessScorer(n_latent, n_categories, n_continuous)
        self.schedule = VPSchedule(beta_min, beta_max, t_min)
        self.register_buffer("lpe_scale", torch.tensor(float(lpe_scale)))
        # standardisation of the aggregate posterior, set between the two training stages
        self.register_buffer("latent_mean", torch.zeros(n_latent))
        self.register_buffer("latent_std", torch.ones(n_latent))

    # ------------------------------------------------------------------ VAE (stage A)
    def _get_inference_input(self, tensors: dict[str, Tensor], **kwargs) -> dict:
        inputs = {key: tensors[key] for key in _ENCODER_INPUTS}
        inputs["n_seed"] = tensors[BATCH_KEYS.ATTRIBUTES].shape[0]
        return inputs

    def project_nodes(self, node_crow: Tensor, node_col: Tensor, node_input: Tensor,
                      n_seed: int | None = None, input_mask: Tensor | None = None) -> Tensor:
        """The encoder's input projection of the nodes, ``(n_nodes, n_hidden)``
        (:meth:`GraphEncoder.project_nodes`), with ``input_mask`` (one 0/1 value per stored
        entry) applied. A training step computes it once for its two passes (the
        perturbation's and the loss's): it does not depend on the edge weights."""
        value = node_input if input_mask is None else node_input * input_mask
        return self.encoder.project_nodes(node_crow, node_col, value, n_seed)

    def inference(
        self,
        node_crow: Tensor | None,
        node_col: Tensor | None,
        node_input: Tensor | None,
        lpe: Tensor,
        edge_index: Tensor,
        edge_weight: Tensor,
        degree_outside: Tensor,
        n_seed: int,
        input_mask: Tensor | None = None,
        use_mean: bool = False,
        node_projection: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Posterior :math:`q(z \\mid x, \\text{graph})` of the seed cells (the first
        ``n_seed`` nodes).

        ``node_input`` holds the log-normalised expression of every node (CSR values).
        ``input_mask`` zeroes masked entries of the encoder's input only (input gene
        masking); the likelihood sees all counts. ``node_projection``: the nodes' input
        projection from :meth:`project_nodes` with the same mask, if computed already (the
        expression is then not read).
        """
        if node_projection is None:
            node_projection = self.project_nodes(node_crow, node_col, node_input, n_seed,
                                                 input_mask)
        mean, logvar = self.encoder(node_projection, lpe * self.lpe_scale, edge_index,
                                    edge_weight, degree_outside, n_seed=n_seed)
        mean, logvar = mean[:n_seed], logvar[:n_seed]
        z = mean if use_mean else mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        return {"qz_mean": mean, "qz_logvar": logvar, "z": z}

    def _get_generative_input(self, tensors, inference_outputs, **kwargs) -> dict:
        return {"z": inference_outputs["z"], "library": tensors[BATCH_KEYS.SEED_LIBRARY][:, None],
                "attributes": tensors[BATCH_KEYS.ATTRIBUTES]}

    def categories(self, attributes: Tensor | None) -> Tensor | None:
        """The categorical codes, ``(n, n_categorical)`` long, of attribute rows (the
        decoder's input); ``None`` for ``None``."""
        if attributes is None:
            return None
        return attributes.reshape(attributes.shape[0], -1)[:, : self.n_categorical].long()

    def generative(self, z: Tensor, library: Tensor, attributes: Tensor | None = None
                   ) -> dict:
        """The likelihood's parameters (``params``, a
        :class:`~scldiff.distributions.CountParams`) and the library sizes; the count
        distribution is ``params.distribution(library)``. ``attributes``: the cells'
        attribute rows, whose categorical codes a decoder with covariates reads."""
        return {"params": self.decoder(z, self.categories(attributes)), "library": library}

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
        likelihood is evaluated sparsely (:func:`~scldiff.distributions.
        sparse_log_likelihood`).
        """
        n_seed = tensors[BATCH_KEYS.ATTRIBUTES].shape[0]
        counts = tensors[BATCH_KEYS.SEED_COUNTS]
        reconstruction = -sparse_log_likelihood(
            generative_outputs["params"], generative_outputs["library"],
            tensors[BATCH_KEYS.NODE_CROW][: n_seed + 1],
            tensors[BATCH_KEYS.NODE_COL][: counts.shape[0]], counts)
        kl = gaussian_kl(inference_outputs["qz_mean"], inference_outputs["qz_logvar"])
        loss = (rec_weight * reconstruction + kl_weight * kl).mean()
        return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local=kl)

    @torch.no_grad()
    def draw_peaks(self, z: Tensor, generator: torch.Generator) -> sp.csr_matrix:
        """Binarised peaks (CSR float32 0/1, ``(n, n_peaks)``) drawn from the accessibility
        decoder's Bernoulli at latents ``z``, with ``generator`` (on ``z``'s device), in
        chunks of rows so that no dense ``(n, n_peaks)`` array is held."""
        blocks = []
        for start in range(0, z.shape[0], _COUNT_CHUNK):
            p = torch.sigmoid(self.accessibility(z[start : start + _COUNT_CHUNK].float()))
            open_ = torch.rand(p.shape, generator=generator, device=p.device) < p
            blocks.append(sp.csr_matrix(open_.cpu().numpy(), dtype=np.float32))
        return sp.vstack(blocks, format="csr") if blocks else \
            sp.csr_matrix((0, self.accessibility.logits.out_features), dtype=np.float32)

    # ------------------------------------------------------------ diffusion (stage B)
    def standardize(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def unstandardize(self, z: Tensor) -> Tensor:
        return z * self.latent_std + self.latent_mean

    @torch.no_grad()
    def set_latent_statistics(self, qz_mean: Tensor, qz_logvar: Tensor) -> None:
        """Mean and std of the aggregate posterior (a mixture of the cells' Gaussians)."""
        self.latent_mean.copy_(qz_mean.mean(0))
        var = qz_logvar.exp().mean(0) + qz_mean.var(0, unbiased=False)
        self.latent_std.copy_(var.sqrt().clamp_min(1e-6))

    def diffusion_loss(self, qz_mean: Tensor, qz_logvar: Tensor, attributes: Tensor,
                       p_uncond: float = 0.1, generator: torch.Generator | None = None
                       ) -> Tensor:
        r"""Denoising MSE on standardised :math:`z_0 \sim q(z \mid x)`, :math:`L_{diff}`:
        of the noise, or with ``prediction="v"`` of :math:`v = \alpha_t\epsilon - \sigma_t
        z_0`, whose loss is the noise's weighted by :math:`1/\alpha_t^2` (Salimans & Ho,
        2022).

        Each of a cell's attributes is dropped to null with probability ``p_uncond``,
        independently per cell and per attribute (:func:`drop_attributes`), so that one
        network learns the score given any subset of them.
        """
        z0 = self.standardize(qz_mean + torch.randn_like(qz_mean) * (0.5 * qz_logvar).exp())
        t = self.schedule.sample_time(z0.shape[0], device=z0.device)
        noise = torch.randn_like(z0)
        zt = self.schedule.add_noise(z0, noise, t)
        attributes = drop_attributes(attributes.reshape(z0.shape[0], -1), p_uncond, generator,
                                     self.block_widths)
        target = self.schedule.velocity(z0, noise, t) if self.prediction == "v" else noise
        return torch.nn.functional.mse_loss(self.score_net(zt, t, attributes), target)

    def predict_noise(self, z: Tensor, t: Tensor, attributes: Tensor) -> Tensor:
        r"""The ScoreNet's noise prediction :math:`\hat\epsilon(z_t, t, c)`, whatever it
        was trained to output: with ``prediction="v"``, :math:`\hat\epsilon = \sigma_t z_t
        + \alpha_t \hat v` (:meth:`~scldiff.diffusion.VPSchedule.noise_from_velocity`)."""
        out = self.score_net(z, t, attributes)
        if self.prediction == "epsilon":
            return out
        return self.schedule.noise_from_velocity(z, out, t)

    # --------------------------------------------------------------------- generation
    def _guided(self, attributes: Tensor, guidance_scale: float | Sequence[float],
                guidance_interval: tuple[float, float] | None) -> ClassifierFreeGuidance:
        """The guided noise predictor of attribute rows ``(n, A)`` or ``(n, A +`` the
        blocks' widths ``)``: rows of the attributes alone get null blocks; a compositional
        ``guidance_scale`` of ``A`` scales gives each block (one attribute of several
        columns) scale 1."""
        device = self.latent_mean.device
        rows = attributes.to(device).float().reshape(attributes.shape[0], -1)
        net = self.score_net
        if rows.shape[1] == net.n_attributes and net.block_widths:
            rows = torch.cat([rows, rows.new_full((rows.shape[0], net.n_columns
                                                   - net.n_attributes), float("nan"))], 1)
        groups = None
        if net.block_widths and not isinstance(guidance_scale, (int, float)):
            guidance_scale = list(guidance_scale)
            if len(guidance_scale) == net.n_attributes:
                guidance_scale += [1.0] * len(net.block_widths)
            groups = [[a] for a in range(net.n_attributes)] + net.block_columns()
        return ClassifierFreeGuidance(self.predict_noise, rows, guidance_scale,
                                      interval=guidance_interval, groups=groups)

    @torch.no_grad()
    def sample_latents(
        self,
        attributes: Tensor,
        guidance_scale: float | Sequence[float] = 1.0,
        sampler: str = "ode",
        n_steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_interval: tuple[float, float] | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """``(n, n_latent)`` latents of the given attribute rows (``(n, A)``, or with the
        blocks, a spot's position or a cell's chromatin, NaN where unconditioned): guided
        reverse diffusion from ``noise`` (default: drawn from N(0, I); ``guidance_scale``:
        one joint scale or one per attribute; ``guidance_interval``: see
        :class:`~scldiff.diffusion.ClassifierFreeGuidance`). Non-finite latents raise
        ``FloatingPointError``."""
        device = self.latent_mean.device
        eps_fn = self._guided(attributes, guidance_scale, guidance_interval)
        if noise is None:
            z = torch.randn(attributes.shape[0], self.n_latent, generator=generator,
                            device=device)
        else:
            z = noise.to(device).float().reshape(attributes.shape[0], self.n_latent)
        steps = n_steps or DEFAULT_STEPS[sampler]
        z = self.unstandardize(SAMPLERS[sampler](eps_fn, z, self.schedule, steps,
                                                 generator=generator))
        if not bool(torch.isfinite(z).all()):
            raise FloatingPointError(
                "The sampled latents are not finite (NaN or infinite): lower "
                f"guidance_scale (now {guidance_scale}), or check the model's weights.")
        return z

    @torch.no_grad()
    def counterfactual_latents(
        self,
        z: Tensor,
        source: Tensor,
        target: Tensor,
        strength: float,
        method: str = "noise",
        guidance_scale: float | Sequence[float] = 1.0,
        sampler: str = "ode",
        n_steps: int | None = None,
        generator: torch.Generator | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> Tensor:
        r"""Latents ``z`` (``(n, n_latent)``) of cells with attribute rows ``source``
        carried to the rows ``target``: taken to the noise level :math:`t = ` ``strength``
        and denoised under ``target`` with guidance from there.

        ``method="noise"`` (SDEdit, Meng et al., 2022): :math:`z_t = \alpha_t z_0 +
        \sigma_t\epsilon` with fresh noise, then ``sampler``. ``"inversion"`` (dual diffusion
        implicit bridges, Su et al., 2023): :func:`~scldiff.diffusion.invert_ddim` under
        ``source``, then DDIM under ``target``, deterministic. Strength 0 (or below
        ``t_min``) returns ``z``; 1 keeps of the cell only what the inversion keeps (nothing,
        with fresh noise). Non-finite latents raise ``FloatingPointError``.
        """
        if method not in COUNTERFACTUAL_METHODS:
            raise ValueError(f"method must be one of {COUNTERFACTUAL_METHODS}, got "
                             f"{method!r}.")
        if strength <= self.schedule.t_min:
            return z
        device = self.latent_mean.device
        z0 = self.standardize(z.to(device))
        t = torch.tensor(float(strength), device=device)
        guided = {a: self._guided(rows.reshape(z0.shape[0], -1), guidance_scale,
                                  guidance_interval)
                  for a, rows in (("source", source), ("target", target))}
        if method == "inversion":
            sampler = "ddim"
            steps = n_steps or DEFAULT_STEPS[sampler]
            zt = invert_ddim(guided["source"], z0, self.schedule, steps, t_end=float(strength))
        else:
            steps = n_steps or DEFAULT_STEPS[sampler]
            noise = torch.randn(z0.shape, generator=generator, device=device)
            zt = self.schedule.add_noise(z0, noise, t)
        out = self.unstandardize(SAMPLERS[sampler](guided["target"], zt, self.schedule, steps,
                                                   generator=generator,
                                                   t_start=float(strength)))
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("The counterfactual latents are not finite: lower "
                                     f"guidance_scale (now {guidance_scale}).")
        return out

    @torch.no_grad()
    def counterfactual_counts(self, counts, z: Tensor, z_target: Tensor, library: Tensor,
                              source: Tensor | None, target: Tensor | None,
                              generator: np.random.Generator) -> sp.csr_matrix:
        """Counts of cells at latents ``z`` with attribute rows ``source`` carried to
        ``z_target`` and ``target``, 256 cells at a time on the CPU (the transport's dense
        float64 arrays stay small on a whole transcriptome): their observed
        ``counts`` transported from the decoder's distribution at ``z`` to the one at
        ``z_target`` (:func:`~scldiff.sampling.transport_counts`, each count at its
        quantile), or with ``counts=None`` fresh draws from the latter
        (:func:`~scldiff.sampling.draw_counts`)."""
        blocks = []
        for start in range(0, z.shape[0], _COUNT_CHUNK):
            w = slice(start, start + _COUNT_CHUNK)
            own, moved = (_on_cpu(self.decoder(latent[w], None if rows is None
                                               else self.categories(rows[w])).with_biases())
                          for latent, rows in ((z, source), (z_target, target)))
            lib = library[w].cpu()
            blocks.append(draw_counts(moved, lib, generator) if counts is None else
                          transport_counts(counts[w], own, moved, lib, generator))
        if not blocks:
            return sp.csr_matrix((0, self.decoder.scale.out_features), dtype=np.float32)
        return blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")

    @torch.no_grad()
    def decode_counts(self, z: Tensor, library: Tensor,
                      generator: np.random.Generator | torch.Generator,
                      attributes: Tensor | None = None) -> sp.csr_matrix:
        """Counts (CSR) of cells with latents ``z``, library sizes ``library`` and attribute
        rows ``attributes`` (whose categorical codes a decoder with covariates reads), drawn
        with
        :func:`~scldiff.sampling.draw_counts`.

        With a numpy ``generator``, on a CPU: the decoder and the draws run on chunks of 256
        cells, each chunk in one of ``torch.get_num_threads()`` worker threads (at most 8),
        its draws from a generator seeded from ``generator`` in chunk order, so that the
        counts depend neither on timing nor on the number of threads. The caller's
        ``torch.autocast`` carries over into the workers. With a ``torch.Generator`` on
        ``z``'s device (a GPU's), all cells at once, drawn there.
        """
        library = library.reshape(-1, 1)
        codes = self.categories(attributes)
        if codes is not None:
            codes = codes.to(z.device)
        if isinstance(generator, torch.Generator):
            if generator.device.type != z.device.type:
                raise ValueError(f"generator is on {generator.device}, the latents on "
                                 f"{z.device}.")
            return draw_counts(self.decoder(z, codes), library, generator)
        z = z.cpu()
        library = library.cpu()
        codes = None if codes is None else codes.cpu()
        starts = range(0, z.shape[0], _COUNT_CHUNK)
        seeds = generator.integers(0, 2**63, size=len(starts))
        dtype = autocast_dtype("cpu")

        def chunk(start: int, seed: int) -> sp.csr_matrix:
            end = start + _COUNT_CHUNK
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                params = self.decoder(z[start:end], None if codes is None
                                      else codes[start:end], bias_apart=True)
            return draw_counts(params, library[start:end], np.random.default_rng(seed))

        workers = min(torch.get_num_threads(), _MAX_DECODE_WORKERS, len(starts))
        if workers <= 1:
            blocks = [chunk(start, seed) for start, seed in zip(starts, seeds, strict=True)]
        else:
            with ThreadPoolExecutor(max_workers=workers) as executor:
                blocks = list(executor.map(chunk, starts, seeds))
        if not blocks:
            return sp.csr_matrix((0, self.decoder.scale.out_features), dtype=np.float32)
        return blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")
