"""``generate()``, ``posterior_predictive_sample()`` and ``posterior_predictive_cells()``:
cells drawn from the model, the AnnData of counts built in one place."""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi.utils import track

from .._version import __version__
from ..diffusion import DEFAULT_STEPS, SAMPLERS, check_guidance_interval, coupled_noise
from ..module._module import autocast_dtype
from ._attributes import (
    Request,
    attribute_rows,
    combination_index,
    guidance_scales,
    obs_request,
    request_rows,
)
from ._constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_NOISE_COUPLING
from ._library import LIBRARY_SIZES
from ._validation import check_keep_fraction, check_positive, gene_columns, resolve_seed

# generate()'s precisions: the dtype of the networks' matrix products under autocast
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# bytes per (cell, gene) entry that generating a batch needs on a GPU at its peak: the
# decoder's outputs, the sampler's bound and uniforms, masks (an estimate with room to
# spare; the measured peak is in docs "Performance")
_GENERATION_BYTES_PER_ENTRY = 48


def default_generation_batch(device: torch.device, n_genes: int) -> int:
    """``generate()``'s default cells per batch: 4096 on a CPU (the decoder works in chunks
    of 256 there anyway); on a GPU as many as fit in an eighth of its memory, in multiples
    of 1024 from 1024 to 65,536. The device's total memory, not its free memory, so that
    the batches, and with them the counts of a seed, do not depend on what else runs on
    it."""
    if device.type != "cuda":
        return 4096
    total = torch.cuda.get_device_properties(device).total_memory
    cells = total // 8 // (max(n_genes, 1) * _GENERATION_BYTES_PER_ENTRY)
    return int(min(max(cells // 1024 * 1024, 1024), 65_536))


def _obs_names(prefix: str, n: int, *parts) -> pd.Index:
    """``{prefix}-{token}-{i}``: the token hashes what determines the cells (seed, labels,
    settings), so that two calls that draw different cells name them differently and
    ``anndata.concat`` of their outputs needs no ``index_unique``."""
    digest = hashlib.blake2b(digest_size=4)
    for part in parts:
        digest.update(part.tobytes() if isinstance(part, np.ndarray) else repr(part).encode())
    token = digest.hexdigest()
    return pd.Index([f"{prefix}-{token}-{i}" for i in range(n)])


class GenerationMixin:
    """:meth:`generate`, :meth:`posterior_predictive_sample` and
    :meth:`posterior_predictive_cells` of :class:`~scldiff.LapDDPM`."""

    def generate(
        self,
        labels=None,
        n_samples: int | None = None,
        guidance_scale: float | dict[str, float] = DEFAULT_GUIDANCE_SCALE,
        sampler: Literal["ode", "ddim", "sde"] = "ode",
        n_steps: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress_bar: bool = True,
        library_size: Literal["latent", "label"] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        precision: Literal["float32", "bfloat16"] = "float32",
        conditions: pd.DataFrame | dict | AnnData | None = None,
        keep_fraction: float = 1.0,
        spots: AnnData | None = None,
        noise_coupling: float = DEFAULT_NOISE_COUPLING,
    ) -> AnnData:
        r"""Generate cells: guided latent diffusion, decoder, library size, count draws.

        Parameters
        ----------
        labels
            ``{label: count}`` or one label per cell: ``conditions`` with the labels alone.
        n_samples
            Number of cells, in the training proportions of the combinations of categorical
            attributes. Without it, ``labels`` or ``conditions``: as many as trained on.
        guidance_scale
            :math:`w` of the joint guidance :math:`v_\varnothing + w(v_c - v_\varnothing)`
            on all given attributes (0 ignores them, 1 samples the conditional model), or
            ``{attribute: w_a}``: compositional guidance :math:`v_\varnothing + \sum_a
            w_a(v_a - v_\varnothing)` (left out: 1), for combinations never seen together;
            a spatial model's position is the attribute named by its ``spatial_key``, a
            multiome model's chromatin the attribute ``"atac"``.
        sampler, n_steps
            ``"ode"`` (probability-flow ODE, DPM-Solver++(2M), 10 steps by default),
            ``"ddim"`` (200) or ``"sde"`` (reverse SDE, Euler–Maruyama, 500), and its steps.
        batch_size
            Cells at a time: 4096 on a CPU; on a GPU as many as keep a batch's dense
            ``(cells, genes)`` arrays within an eighth of its memory.
        seed
            The same seed and ``batch_size`` give the same counts on the same kind of
            device, also after save and load. ``None``: a draw from torch's global generator
            (``scvi.settings.seed``); ``uns["scldiff"]["seed"]`` records it.
        progress_bar, library_size
            Show a progress bar; ``"latent"`` or ``"label"``
            (:class:`~scldiff.model.LibrarySizeModel`, ``None``: the model's).
        guidance_interval
            ``(t_low, t_high)``: guide only at those times (Kynkäänniemi et al., 2024).
        precision
            ``"float32"``, or ``"bfloat16"`` for the networks' products where the hardware
            computes bf16 natively (docs "Performance").
        conditions
            A :class:`pandas.DataFrame`, a row per cell, a column per attribute
            (:attr:`attribute_keys`; left out or NaN: unconditioned), or ``{(value, ...):
            count}`` in that order. Categorical values not given are drawn from the training
            cells sharing the given ones (docs "The model"). Unseen combinations warn.
            A multiome model (set up with ``modality_key``) also takes an AnnData of cells'
            peaks (the training peaks, :attr:`peak_names`, counts or 0/1; other features are
            ignored): one cell per row, its RNA generated for its chromatin (embedded with
            the saved LSI); attributes in its ``obs`` guide too, and categorical ones it
            lacks are those of the training cell nearest in chromatin.
        keep_fraction
            Post-guidance filter :math:`q \in (0, 1]` (SCLD): keep the best-scored
            :math:`1/q`-th of each request's candidates. 1 (default): off.
        spots
            A spatial model (set up with ``spatial_key``): an AnnData whose
            ``obsm[spatial_key]`` holds the positions of the spots to generate, in the
            training section's frame; the attributes in its ``obs`` (e.g. domain labels)
            guide them, categorical ones it lacks are its nearest training spot's. Each spot
            is guided on its position too (its spatial LPE, extended to new positions from
            the nearest training spots). ``None`` with no ``labels``, ``n_samples`` or
            ``conditions``: every spot of the training section.
        noise_coupling
            For ``spots``: the share :math:`\rho \in [0, 1]` of each spot's starting noise
            that it shares with its neighbourhood (:func:`~scldiff.diffusion.coupled_noise`;
            every spot's own noise stays :math:`\mathcal N(0, I)`), so that neighbouring
            spots are drawn alike as in a tissue (docs "Benchmarks").

        Returns
        -------
        AnnData of integer counts of the genes in ``X`` (CSR) and ``layers["counts"]`` (with
        ``accessibility_decoder=True`` then the cells' 0/1 peaks, ``var[modality_key]``
        marking each: paired cells in the training layout), a column of ``obs`` per
        attribute (categorical in training order, unused categories dropped; continuous,
        NaN where unconditioned), ``obs["synthetic"] = True``, every choice in
        ``uns["scldiff"]``, obs names ``synthetic-{token}-{i}`` unique to the draw. A
        section keeps the spots' obs names, coordinates (``obsm[spatial_key]``) and
        neighbourhood graph (``obsp["spatial_connectivities"]``, squidpy's layout). Cells
        generated from chromatin keep the conditions' obs names and their LSI embedding in
        ``obsm["X_scldiff_lsi"]``.
        """
        self._check_if_trained(warn=False)
        sampling, library_size, batch_size = self._generation_settings(
            guidance_scale, sampler, n_steps, batch_size, precision, library_size,
            guidance_interval)
        keep_fraction = check_keep_fraction(keep_fraction)
        seed = resolve_seed(seed)
        draw_seed, fill_seed = np.random.SeedSequence(seed).spawn(2)
        if self._wants_section(spots, labels, n_samples, conditions):
            return self._generate_section(spots, noise_coupling, keep_fraction, sampling,
                                          library_size, batch_size, seed, precision,
                                          progress_bar)
        if isinstance(conditions, AnnData):
            return self._generate_from_chromatin(conditions, labels, n_samples, keep_fraction,
                                                 sampling, library_size, batch_size, seed,
                                                 precision, progress_bar)
        request = self._request(conditions, labels, n_samples, fill_seed)
        blocks, computed_in = self._draw_in_precision(
            precision, request, batch_size, draw_seed, progress_bar, library_size, sampling,
            keep_fraction)
        return self._counts_anndata(blocks, request.filled, "synthetic", self._provenance(
            sampling, seed=seed, batch_size=int(batch_size), library_size=library_size,
            precision=computed_in, keep_fraction=keep_fraction, conditioned_on=request.given,
            unseen_combinations=request.unseen))

    def _request(self, conditions, labels, n_samples, seed: np.random.SeedSequence
                 ) -> Request:
        """The attribute rows of the requested cells (:func:`request_rows`), warning of
        combinations that no training cell has."""
        if labels is None and n_samples is None and conditions is None:
            n_samples = len(self.train_indices_)
        request = request_rows(conditions, labels, n_samples, self.attributes,
                               self.combinations_, np.random.default_rng(seed), self.labels_key)
        if request.unseen:
            warnings.warn(f"Combinations no training cell has: {request.unseen}; the model "
                          "composes them from the attributes seen apart, a prediction "
                          "rather than a fit to data.", UserWarning, stacklevel=3)
        return request

    def _request_from_obs(self, obs: pd.DataFrame, nearest: np.ndarray | None,
                          seed: np.random.SeedSequence) -> Request:
        """The attribute rows of cells given one per row (spots, chromatin states): the
        attributes among the columns of ``obs`` guide them; categorical ones not given are
        those of training cell ``nearest[i]`` (for the decoder and the library sizes, not
        guided on; ``None``: drawn from the training combinations)."""
        request = obs_request(obs, self.attributes, self.combinations_,
                              np.random.default_rng(seed), self.labels_key)
        n_cat = self.module.n_categorical
        if n_cat and nearest is not None:
            manager = self.get_anndata_manager(self.adata, required=True)
            training = attribute_rows(manager, self.attributes)[nearest, :n_cat]
            missing = np.isnan(request.guide[:, :n_cat])
            request.filled[:, :n_cat] = np.where(missing, training, request.guide[:, :n_cat])
        return request

    def _provenance(self, sampling: dict, **choices) -> dict:
        """The sampler's settings and the other ``choices`` as ``uns["scldiff"]`` records
        them."""
        scale = sampling["guidance_scale"]
        compositional = isinstance(scale, list)
        keys = self.attribute_keys
        if compositional and len(scale) > len(keys):  # and the blocks'
            keys = [*keys, *self._block_keys()]
        return {**choices, **sampling,
                "guidance_scale": dict(zip(keys, scale, strict=True))
                if compositional else scale,
                "guidance": "compositional" if compositional else "joint",
                "guidance_interval": list(sampling["guidance_interval"] or (0.0, 1.0))}

    def _draw_in_precision(self, precision: str, *args) -> tuple[list[sp.csr_matrix], str]:
        """:meth:`_draw_batches` (``args``) with the networks' products in ``precision``,
        and the name of the dtype they were computed in (a caller's autocast counts too)."""
        self.module.eval()
        autocast = contextlib.nullcontext() if precision == "float32" else \
            torch.autocast(self.device.type, dtype=PRECISIONS[precision])
        with autocast:
            computed_in = autocast_dtype(self.device.type)
            blocks = self._draw_batches(*args)
        return blocks, "float32" if computed_in is None else str(computed_in).split(".")[-1]

    def _generation_settings(self, guidance_scale, sampler, n_steps, batch_size, precision,
                             library_size, guidance_interval) -> tuple[dict, str, int]:
        """:meth:`generate`'s arguments checked (``ValueError`` naming a bad one), with
        their defaults: the sampler's arguments, the library-size mode and the batch
        size."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
        guidance_scale = guidance_scales(guidance_scale, self.attributes, self._block_keys())
        check_positive("n_steps", n_steps)
        check_positive("batch_size", batch_size)
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got "
                             f"{precision!r}.")
        library_size = self.library_size if library_size is None else library_size
        if library_size not in LIBRARY_SIZES:
            raise ValueError(f"library_size must be one of {LIBRARY_SIZES}, got "
                             f"{library_size!r}.")
        if batch_size is None:
            batch_size = default_generation_batch(self.device, self.n_genes)
        guided = bool(self.module.score_net.n_columns)
        sampling = {"guidance_scale": guidance_scale if guided else 1.0,
                    "sampler": sampler, "n_steps": int(n_steps or DEFAULT_STEPS[sampler]),
                    "guidance_interval": check_guidance_interval(guidance_interval)}
        return sampling, library_size, batch_size

    def _draw_batches(self, request: Request, batch_size: int,
                      seed_sequence: np.random.SeedSequence, progress_bar: bool,
                      library_size: str, sampling: dict, keep_fraction: float = 1.0,
                      blocks: np.ndarray | None = None,
                      coupled: tuple[float, object] | None = None) -> list[sp.csr_matrix]:
        """The counts of the requested cells, ``batch_size`` at a time: latents guided on
        ``request.guide`` (``sampling``: :meth:`~scldiff.module.LapDDPMModule.
        sample_latents`' arguments; filtered by :meth:`_keep_best` when ``keep_fraction <
        1``), library sizes and counts given ``request.filled``. The latents and library
        sizes, and a GPU's counts, come from a torch generator, a CPU's counts from numpy,
        both seeded from ``seed_sequence``. ``blocks``: the requested cells' block columns
        (spots' positions, cells' chromatin), guided on too; ``coupled``: ``(coupling,
        graph)`` of spots whose latents start from noise coupled along ``graph``
        (:func:`~scldiff.diffusion.coupled_noise`)."""
        device = self.device
        torch_seed, numpy_seed = seed_sequence.spawn(2)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch_seed.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        counts_generator = generator if device.type != "cpu" else \
            np.random.default_rng(numpy_seed)
        n_cat = self.module.n_categorical
        groups = combination_index(request.filled[:, :n_cat], self.combinations_)
        guide_rows, noise = request.guide, None
        if blocks is not None:
            guide_rows = np.concatenate([request.guide, blocks], axis=1)
        if coupled is not None:
            noise = coupled_noise(coupled[1], self.module.n_latent, coupled[0],
                                  generator=generator, device=device)
        blocks = []
        for start in track(range(0, len(groups), batch_size), description="Generating cells",
                           disable=not progress_bar, style="tqdm"):
            window = slice(start, start + batch_size)
            guide = torch.from_numpy(guide_rows[window]).to(device)
            filled = torch.from_numpy(request.filled[window]).to(device)
            if keep_fraction < 1.0:
                z = self._keep_best(guide, filled, keep_fraction, generator, sampling)
            else:
                z = self.module.sample_latents(
                    guide, generator=generator, **sampling,
                    noise=None if noise is None else noise[window])
            library = self.library_model_.draw(
                library_size, z, torch.from_numpy(groups[window]).to(device), generator,
                self.module.categories(filled))
            counts = self.module.decode_counts(z, library, counts_generator, filled)
            if self.module.accessibility is not None:  # and the cells' peaks
                counts = sp.hstack([counts, self.module.draw_peaks(z, generator)], "csr")
            blocks.append(counts)
        return blocks

    def _keep_best(self, guide: torch.Tensor, filled: torch.Tensor, keep_fraction: float,
                   generator: torch.Generator, sampling: dict) -> torch.Tensor:
        """Latents of the rows of ``guide``: :math:`m = \\lceil 1/q \\rceil` candidates per
        row, scored by the post-guidance scorer on the row's attributes (categorical ones
        filled), and for each distinct requested row the best-scored as many as it was
        requested, in the order of the requests."""
        m = math.ceil(1.0 / keep_fraction - 1e-9)
        candidates = self.module.sample_latents(guide.repeat_interleave(m, 0),
                                                generator=generator, **sampling)
        with torch.no_grad():
            score = self.module.scorer(self.module.standardize(candidates),
                                       filled.repeat_interleave(m, 0))
        if guide.shape[1]:  # requests alike in what is given and what was drawn
            key = torch.nan_to_num(torch.cat([guide, filled], 1), nan=math.inf)
            _, request_group = torch.unique(key, dim=0, return_inverse=True)
        else:
            request_group = torch.zeros(guide.shape[0], dtype=torch.long, device=guide.device)
        candidate_group = request_group.repeat_interleave(m)
        z = torch.empty_like(candidates[: guide.shape[0]])
        for g in torch.unique(request_group):
            rows = torch.nonzero(request_group == g).ravel()
            pool = torch.nonzero(candidate_group == g).ravel()
            best = pool[torch.argsort(score[pool], descending=True, stable=True)[: rows.numel()]]
            z[rows] = candidates[best]
        return z

    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: np.ndarray | None = None,
        n_samples: int = 1,
        gene_list: list[str] | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress_bar: bool = False,
    ):
        r"""Counts drawn from each cell's posterior predictive :math:`p(\hat x \mid x)`, as
        scvi-tools' models return them (so that :class:`scvi.criticism.PosteriorPredictiveCheck`
        takes a LapDDPM model): :math:`z \sim q(z \mid x)`, encoded on the full cell graph,
        decoded with the cell's own library size, counts drawn from the likelihood. No
        diffusion: the diffusion cannot do better than the posterior it was trained on.

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells to draw, in this order (default: all).
        n_samples
            Draws per cell.
        gene_list
            Genes to return (default: all).
        batch_size
            Seed cells per encoding batch (default 512).
        seed
            Seed of the latent and count draws (``None``: from ``scvi.settings.seed``, as
            :meth:`generate`).
        progress_bar
            Show a progress bar while encoding.

        Returns
        -------
        :class:`sparse.GCXS` of shape ``(n_cells, n_genes)`` if ``n_samples == 1``, else
        ``(n_cells, n_genes, n_samples)``. :meth:`posterior_predictive_cells` returns the
        draws as an AnnData.
        """
        import sparse

        check_positive("n_samples", n_samples)
        adata = self._validate_anndata(adata)
        cells = self._check_indices(adata, indices)
        counts, _ = self._posterior_draws(adata, np.repeat(cells, n_samples), batch_size,
                                          resolve_seed(seed), progress_bar)
        if gene_list is not None:
            counts = counts[:, gene_columns(self.gene_names, gene_list)]
        coo = counts.tocoo()
        if n_samples == 1:
            return sparse.GCXS(sparse.COO((coo.row, coo.col), coo.data, shape=coo.shape),
                               compressed_axes=(0,))
        coords = (coo.row // n_samples, coo.col, coo.row % n_samples)
        return sparse.GCXS(sparse.COO(coords, coo.data,
                                      shape=(cells.size, coo.shape[1], n_samples)),
                           compressed_axes=(0,))

    def posterior_predictive_cells(
        self,
        adata: AnnData | None = None,
        indices: np.ndarray | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress_bar: bool = False,
    ) -> AnnData:
        """:meth:`posterior_predictive_sample`'s draws as an AnnData like :meth:`generate`'s,
        with the cells' own labels: comparing them with generated cells tells the count
        model's share of a gap to real data from the latent diffusion's.

        Parameters
        ----------
        adata, batch_size, progress_bar
            As :meth:`posterior_predictive_sample`.
        indices
            Cells to draw, in this order; repeat an index for several draws of a cell
            (default: all cells once).
        seed
            Seed of the draws (``None``: from ``scvi.settings.seed``).

        Returns
        -------
        AnnData like :meth:`generate`'s; ``obs["source_cell"]`` names the cell each row was
        drawn from.
        """
        adata = self._validate_anndata(adata)
        indices = self._check_indices(adata, indices)
        seed = resolve_seed(seed)
        counts, rows = self._posterior_draws(adata, indices, batch_size, seed, progress_bar)
        synth = self._counts_anndata([counts], rows, "posterior",
                                     {"seed": seed, "draw": "posterior predictive"},
                                     name_parts=(indices,))
        synth.obs["source_cell"] = np.asarray(adata.obs_names[indices], dtype=str)
        return synth

    @staticmethod
    def _check_indices(adata: AnnData, indices) -> np.ndarray:
        indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        if indices.ndim != 1 or (indices.size and (
                not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0
                or indices.max() >= adata.n_obs)):
            raise ValueError(f"indices must be integer positions of cells in [0, "
                             f"{adata.n_obs}), got {indices!r}.")
        return indices

    def _posterior_draws(self, adata: AnnData, indices: np.ndarray, batch_size: int | None,
                         seed: int, progress_bar: bool) -> tuple[sp.csr_matrix, np.ndarray]:
        """Counts (CSR, one row per entry of ``indices``) decoded from one draw of each
        entry's posterior, with its own library size; and the entries' attribute rows."""
        self._check_if_trained(warn=True)
        check_positive("batch_size", batch_size)
        collator = self._collator(adata)
        unique, inverse = np.unique(indices, return_inverse=True)
        mean, logvar = self._posterior(collator, unique, batch_size or 512, progress_bar)
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        mean, logvar = mean[inverse], logvar[inverse]
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        library = torch.from_numpy(collator.library[indices].astype(np.float32))
        rows = collator.attributes[indices]
        self.module.eval()
        counts = self.module.decode_counts(z.to(self.device), library.to(self.device), rng,
                                           torch.from_numpy(rows).to(self.device))
        return counts, rows

    def _counts_anndata(self, blocks: list[sp.csr_matrix], rows: np.ndarray, prefix: str,
                        provenance: dict, name_parts: tuple = ()) -> AnnData:
        """The AnnData of drawn counts: ``X`` and ``layers["counts"]`` (CSR, sharing no
        memory, so that normalising ``X`` in place leaves the counts), the training genes, a
        column of ``obs`` per attribute from the attribute rows ``rows`` (categorical in the
        training order, categories that no cell has dropped so that
        ``sc.tl.rank_genes_groups`` takes it; continuous values, NaN where not given),
        ``obs["synthetic"]`` and ``uns["scldiff"]``. Blocks with peaks (an accessibility
        decoder's) give the training layout: the genes, then the peaks, marked in
        ``var[modality_key]``."""
        n_genes = self.n_genes
        x = sp.vstack(blocks, format="csr") if len(blocks) > 1 else \
            blocks[0] if blocks else sp.csr_matrix((0, n_genes), dtype=np.float32)
        obs = pd.DataFrame(index=_obs_names(prefix, rows.shape[0], rows, provenance,
                                            *name_parts))
        for a, attribute in enumerate(self.attributes):
            if attribute.kind == "categorical":
                obs[attribute.key] = pd.Categorical.from_codes(
                    rows[:, a].astype(np.int64), categories=list(attribute.categories)
                ).remove_unused_categories()
            else:
                obs[attribute.key] = rows[:, a].astype(np.float64) * attribute.std + attribute.mean
        obs["synthetic"] = True
        var = pd.DataFrame(index=pd.Index(self.gene_names))
        if x.shape[1] > n_genes:
            var = pd.DataFrame({self.modality_key: ["rna"] * n_genes + ["atac"] * (
                x.shape[1] - n_genes)}, index=pd.Index([*self.gene_names, *self.peak_names]))
        uns = {"scldiff": {"model": type(self).__name__, "scldiff_version": __version__,
                           "scvi_tools_version": self.registry_.get("scvi_version", ""),
                           "torch_version": str(torch.__version__),
                           "likelihood": self.module.likelihood,
                           "labels_key": self.labels_key or "",
                           "attributes": self.attribute_keys, **provenance}}
        return AnnData(X=x, obs=obs, var=var, layers={"counts": x.copy()}, uns=uns)
