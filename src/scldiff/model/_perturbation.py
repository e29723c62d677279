"""``predict_perturbation()``: real cells carried to another value of one attribute through
the diffusion model (counterfactual cells), one or many draws of the perturbed population."""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi.utils import track

from ..graph import log_normalize
from ..metrics._perturbation import response_intervals
from ..module import COUNTERFACTUAL_METHODS
from ._attributes import Attribute, combination_index
from ._constants import (
    DEFAULT_PERTURBATION_GUIDANCE,
    DEFAULT_PERTURBATION_STRENGTH,
    REGISTRY_KEYS,
)
from ._validation import check_positive, resolve_seed


def _target_value(attribute: Attribute, to) -> float:
    """``to`` as the networks read it: a category's code, or a standardised value."""
    if attribute.kind == "categorical":
        if str(to) not in attribute.categories:
            raise ValueError(f"{to!r} is not a category of {attribute.key!r} the model was "
                             f"trained on; choose one of {list(attribute.categories)}.")
        return float(attribute.categories.index(str(to)))
    if isinstance(to, bool) or not isinstance(to, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(to)):
        raise ValueError(f"to must be a finite number for the continuous covariate "
                         f"{attribute.key!r}, got {to!r}.")
    if not attribute.low <= float(to) <= attribute.high:
        warnings.warn(f"{attribute.key}={to} lies outside the training range [{attribute.low}"
                      f", {attribute.high}]: an extrapolation.", UserWarning, stacklevel=3)
    return (float(to) - attribute.mean) / attribute.std


def _check_strength(strength) -> float:
    if strength is None:
        return DEFAULT_PERTURBATION_STRENGTH
    if isinstance(strength, bool) or not isinstance(
            strength, (int, float, np.integer, np.floating)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (the noise level the cells "
                         f"are taken to) or None, got {strength!r}.")
    return float(strength)


class PerturbationMixin:
    """:meth:`predict_perturbation` of :class:`~scldiff.LapDDPM`."""

    def predict_perturbation(
        self,
        adata: AnnData | None = None,
        covariate: str = "condition",
        to=None,
        strength: float | None = None,
        n_draws: int = 1,
        seed: int | None = None,
        indices: np.ndarray | None = None,
        method: Literal["noise", "inversion"] = "noise",
        guidance_scale: float | dict[str, float] | None = None,
        keep_noise: bool = True,
        level: float = 0.95,
        batch_size: int = 4096,
        progress_bar: bool = True,
    ) -> AnnData:
        r"""Counterfactual cells: the given real cells as they would be with ``covariate``
        set to ``to`` (PerturbDiff; compare scVI's ``transform_batch``).

        Each cell's latent, drawn from its posterior, is taken to the noise level
        :math:`t =` ``strength`` and denoised under the cell's attributes with ``covariate``
        changed (:meth:`~scldiff.module.LapDDPMModule.counterfactual_latents`); the cell's
        counts are carried from the decoder's distribution at its latent to the one at the
        new latent, with its own library size. ``strength`` trades the cell's identity (0:
        the latent unchanged) against the response (1: a new cell of the requested
        attributes). Draws are independent predictions of the whole population: new
        posterior draws, noise and counts. Train the model with ``decoder_covariates=False``:
        the response must live in the latent (docs "The model").

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        covariate
            A categorical attribute (:attr:`attribute_keys`), or a continuous covariate.
        to
            The category (or value) to carry the cells to; other combinations never seen in
            training are composed from the attributes seen apart (docs "The model").
        strength
            Noise level in [0, 1]; ``None``: the default measured in docs "Benchmarks".
        n_draws
            Independent predictions of the population, stacked with ``obs["draw"]``; from 2
            on, ``var`` holds each gene's mean and central ``level`` interval over draws
            (:func:`~scldiff.metrics.response_intervals`).
        seed
            Seed of all draws (``None``: from ``scvi.settings.seed``).
        indices
            Cells of ``adata`` to carry (default: all).
        method
            ``"noise"`` (fresh noise, SDEdit; the ODE sampler) or ``"inversion"`` (the
            DDIM path inverted under the cell's own attributes, deterministic given the
            latent).
        guidance_scale
            As :meth:`generate`'s: one joint scale or ``{attribute: w}``. ``None``:
            compositional guidance with ``covariate`` at 3 and every other attribute at 1,
            which carries the response to combinations never seen in training best (docs
            "Benchmarks"; joint guidance at 1.5 under-predicts it).
        keep_noise
            Carry each observed count to the counterfactual's count distribution by its
            quantile (:func:`~scldiff.sampling.transport_counts`), so that the cell keeps
            its own count noise and, where the distribution does not change, its counts
            exactly; ``False``: draw fresh counts from the counterfactual's distribution.
        level
            Coverage of the intervals in ``var``.
        batch_size, progress_bar
            Cells per diffusion batch; show progress (encoding, then the draws' batches).

        Returns
        -------
        AnnData of counts (``X``, ``layers["counts"]``) with a row per cell and draw: the
        cells' ``obs`` with ``covariate`` set to ``to``, ``obs["source_cell"]`` (the cell
        it came from), ``obs["draw"]``, ``obs["synthetic"] = True``; ``obsm["X_scldiff"]``
        the carried latents; every choice in ``uns["scldiff"]``. The input is not changed.
        """
        self._check_if_trained(warn=False)
        a, value, carry = self._perturbation_settings(covariate, to, strength, n_draws,
                                                      batch_size, method, guidance_scale,
                                                      level)
        seed = resolve_seed(seed)
        if adata is not None:
            self._check_attribute_columns(adata)
        adata = self._validate_anndata(adata)
        cells = self._check_indices(adata, indices)
        collator = self._collator(adata)
        self._check_library(adata, collator.library[cells], cells)
        mean, logvar = self._posterior(collator, cells, 512, progress_bar)
        target = collator.attributes[cells].copy()
        target[:, a] = value
        observed = self._observed(adata, cells) if keep_noise or n_draws > 1 else None
        counts, latents = self._counterfactual_draws(
            mean, logvar, collator.attributes[cells], target, collator.library[cells],
            n_draws, seed, carry, batch_size, observed if keep_noise else None, progress_bar)
        out = self._counterfactual_anndata(adata, cells, counts, latents, target, covariate,
                                           to, n_draws)
        out.uns["scldiff"].update(self._provenance(
            {k: carry[k] for k in ("guidance_scale", "sampler", "n_steps")}
            | {"guidance_interval": None}, seed=seed, covariate=covariate,
            to=float(to) if self.attributes[a].kind == "continuous" else str(to),
            strength=carry["strength"], method=method, n_draws=int(n_draws),
            keep_noise=bool(keep_noise), unseen_combinations=self._unseen(target)))
        if n_draws > 1:
            self._add_intervals(out, observed, level, seed)
        return out

    def _perturbation_settings(self, covariate, to, strength, n_draws, batch_size, method,
                               guidance_scale, level) -> tuple[int, float, dict]:
        """:meth:`predict_perturbation`'s arguments checked (``ValueError`` naming a bad
        one): the covariate's column, the value the networks read for ``to``, and the
        arguments of :meth:`~scldiff.module.LapDDPMModule.counterfactual_latents`."""
        if covariate not in self.attribute_keys:
            raise ValueError(f"{covariate!r} is not an attribute of this model; choose one of "
                             f"{self.attribute_keys} (set up with labels_key or "
                             "categorical_covariate_keys).")
        a = self.attribute_keys.index(covariate)
        value = _target_value(self.attributes[a], to)
        if self.module.decoder.n_categories and self.attributes[a].kind == "categorical":
            warnings.warn(f"The decoder reads {covariate!r}: the predicted response is mostly "
                          "the decoder's shift, the same for every cell type. Train with "
                          "decoder_covariates=False for responses that differ between cell "
                          "types (docs 'The model').", UserWarning, stacklevel=3)
        strength = _check_strength(strength)
        if isinstance(level, bool) or not isinstance(
                level, (int, float, np.integer, np.floating)) or not 0.0 < level < 1.0:
            raise ValueError(f"level must be a number in (0, 1), got {level!r}.")
        check_positive("n_draws", n_draws)
        check_positive("batch_size", batch_size)
        if method not in COUNTERFACTUAL_METHODS:
            raise ValueError(f"method must be one of {COUNTERFACTUAL_METHODS}, got "
                             f"{method!r}.")
        if guidance_scale is None:
            guidance_scale = {key: DEFAULT_PERTURBATION_GUIDANCE if key == covariate else 1.0
                              for key in self.attribute_keys}
        sampler = "ddim" if method == "inversion" else "ode"
        sampling, _, _ = self._generation_settings(guidance_scale, sampler, None, batch_size,
                                                   "float32", None, None)
        return a, value, {"strength": strength, "method": method, "sampler": sampler,
                          "guidance_scale": sampling["guidance_scale"],
                          "n_steps": sampling["n_steps"]}

    def _check_attribute_columns(self, adata: AnnData) -> None:
        """A ``ValueError`` naming the column and values where ``adata`` lacks an attribute's
        column or holds categories the model was not trained on (before scvi-tools'
        transfer of the set-up, which marks the AnnData)."""
        for attribute in self.attributes:
            if attribute.key not in adata.obs:
                raise ValueError(f"adata.obs has no column {attribute.key!r}, an attribute of "
                                 "this model; add it (the cells' own values).")
            if attribute.kind == "categorical":
                values = pd.unique(adata.obs[attribute.key].astype(str))
                unknown = sorted(set(values) - set(attribute.categories))
                if unknown:
                    raise ValueError(
                        f"adata.obs[{attribute.key!r}] has values the model was not trained "
                        f"on: {unknown[:5]}; it knows {list(attribute.categories)}.")

    @staticmethod
    def _check_library(adata: AnnData, library: np.ndarray, cells: np.ndarray) -> None:
        """A ``ValueError`` for no cells, or cells without counts."""
        if cells.size == 0:
            raise ValueError("No cells to carry: indices selects none; pass the positions of "
                             "the cells to predict.")
        empty = np.flatnonzero(library <= 0)
        if empty.size:
            names = list(adata.obs_names[cells[empty[:5]]])
            raise ValueError(f"{empty.size} of the cells have no counts (e.g. {names}); a "
                             "counterfactual keeps its cell's library size and encodes its "
                             "expression, so drop them first.")

    def _unseen(self, target: np.ndarray) -> list[list[str]]:
        """The combinations of categorical attributes in ``target`` no training cell has."""
        n_cat = self.module.n_categorical
        codes = np.unique(target[:, :n_cat].astype(np.int64), axis=0)
        missing = codes[combination_index(codes, self.combinations_)
                        == len(self.combinations_["counts"])]
        return [[self.attributes[i].categories[c] for i, c in enumerate(row)]
                for row in missing.tolist()]

    def _observed(self, adata: AnnData, cells: np.ndarray) -> sp.csr_matrix:
        """The registered counts of ``cells`` (CSR, float32)."""
        manager = self.get_anndata_manager(adata, required=True)
        counts = self._gene_counts(manager.get_from_registry(REGISTRY_KEYS.X_KEY))
        return sp.csr_matrix(counts[cells], dtype=np.float32)

    def _counterfactual_draws(self, mean, logvar, source, target, library, n_draws: int,
                              seed: int, carry: dict, batch_size: int,
                              observed: sp.csr_matrix | None, progress_bar: bool
                              ) -> tuple[sp.csr_matrix, np.ndarray]:
        """Counts (draw by draw, cells in order) and latents of ``n_draws`` counterfactuals
        of each cell, the ``observed`` counts transported or (``None``) fresh ones drawn;
        draw ``d`` from the ``d``-th child of ``SeedSequence(seed)``."""
        device = self.device
        self.module.eval()
        blocks, latents = [], []
        children = np.random.SeedSequence(seed).spawn(n_draws)
        steps = [(d, start) for d in range(n_draws) for start in range(0, len(mean), batch_size)]
        for d, start in track(steps, description="Counterfactual draws",
                              disable=not progress_bar, style="tqdm"):
            if start == 0:  # a new draw
                rng = np.random.default_rng(children[d])
                generator = torch.Generator(device=device).manual_seed(
                    int(rng.integers(2**62)))
            window = slice(start, start + batch_size)
            noise = torch.randn(mean[window].shape, generator=generator, device=device)
            z = mean[window].to(device) + torch.exp(0.5 * logvar[window]).to(device) * noise
            rows = [torch.from_numpy(r[window]).to(device) for r in (source, target)]
            carried = self.module.counterfactual_latents(z, *rows, generator=generator,
                                                         **carry)
            lib = torch.from_numpy(library[window].astype(np.float32))
            blocks.append(self.module.counterfactual_counts(
                None if observed is None else observed[window], z, carried, lib, *rows,
                rng))
            latents.append(carried.cpu().numpy())
        return sp.vstack(blocks, format="csr"), np.concatenate(latents)

    def _counterfactual_anndata(self, adata: AnnData, cells: np.ndarray, counts, latents,
                                target: np.ndarray, covariate: str, to, n_draws: int
                                ) -> AnnData:
        """The counterfactuals' AnnData (``target``: the cells' new attribute rows);
        ``uns["scldiff"]`` as :meth:`generate`'s."""
        template = self._counts_anndata([counts], np.tile(target, (n_draws, 1)),
                                        "counterfactual", {})
        obs = adata.obs.iloc[np.tile(cells, n_draws)]
        obs = obs[[c for c in obs.columns if not str(c).startswith("_scvi")]].copy()
        column = obs[covariate]
        if isinstance(column.dtype, pd.CategoricalDtype) or column.dtype == object:
            categories = list(self.attributes[self.attribute_keys.index(covariate)].categories)
            obs[covariate] = pd.Categorical([str(to)] * len(obs), categories=categories)
        else:
            obs[covariate] = float(to)
        obs["source_cell"] = np.asarray(obs.index, dtype=str)
        obs["draw"] = np.repeat(np.arange(n_draws), cells.size)
        obs["synthetic"] = True
        obs.index = pd.Index([f"{name}-{covariate}={to}-{d}" for name, d in
                              zip(obs["source_cell"], obs["draw"], strict=True)])
        out = AnnData(X=template.X, obs=obs, var=template.var, layers=dict(template.layers),
                      obsm={"X_scldiff": latents.astype(np.float32)}, uns=template.uns)
        out.obs_names_make_unique()
        return out

    @staticmethod
    def _add_intervals(out: AnnData, source: sp.csr_matrix, level: float, seed: int) -> None:
        """``var`` columns of :func:`~scldiff.metrics.response_intervals` over the draws,
        against the ``source`` cells' own counts, all log-normalised and kept sparse."""
        summary = response_intervals(log_normalize(out.X), out.obs["draw"].to_numpy(),
                                     log_normalize(source), level=level, seed=seed)
        for column in summary:
            out.var[column] = summary[column].to_numpy()
        out.uns["scldiff"]["level"] = float(level)
