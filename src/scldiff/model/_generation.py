"""``generate()``, ``posterior_predictive_sample()`` and ``posterior_predictive_cells()``:
cells drawn from the model, the AnnData of counts built in one place."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from scvi.utils import track

from .._version import __version__
from ..diffusion import DEFAULT_STEPS, SAMPLERS, check_guidance_interval
from ..module._module import autocast_dtype
from ._library import LIBRARY_SIZES
from ._validation import (
    check_positive,
    gene_columns,
    resolve_generation_labels,
    resolve_seed,
)

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
        guidance_scale: float = 1.5,
        sampler: Literal["ode", "ddim", "sde"] = "ode",
        n_steps: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress_bar: bool = True,
        library_size: Literal["latent", "label"] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        precision: Literal["float32", "bfloat16"] = "float32",
    ) -> AnnData:
        r"""Generate cells: guided latent diffusion, decoder, library size, count draws.

        Parameters
        ----------
        labels
            A mapping ``{label: count}``, or a sequence with one label per cell. ``None``
            gives ``n_samples`` cells in the training label proportions.
        n_samples
            Number of cells when ``labels`` is ``None`` (default: as many as trained on).
        guidance_scale
            Classifier-free guidance :math:`w` in :math:`\epsilon_u + w(\epsilon_c -
            \epsilon_u)`: 0 ignores the labels in the latents, 1 samples the conditional
            model, larger values sharpen the labels (unconditional models: ignored).
        sampler, n_steps
            ``"ode"`` (probability-flow ODE, DPM-Solver++(2M), 10 steps by default),
            ``"ddim"`` (200) or ``"sde"`` (reverse SDE, Euler–Maruyama, 500), and its steps.
        batch_size
            Cells generated at a time: by default 4096 on a CPU, and on a GPU as many as
            keep a batch's dense ``(cells, genes)`` arrays within an eighth of its memory.
        seed
            Seed of the random numbers: the same seed and ``batch_size`` give the same
            counts on the same kind of device, also after save and load (a GPU draws the
            counts from a torch generator, a CPU from numpy: other counts, same law).
            ``None``: one draw from torch's global generator, so that
            ``scvi.settings.seed`` makes the call reproducible; ``uns["scldiff"]["seed"]``
            records the seed used.
        progress_bar
            Show a progress bar.
        library_size
            ``"latent"`` or ``"label"`` (:class:`~scldiff.model.LibrarySizeModel`);
            ``None``: the model's.
        guidance_interval
            ``(t_low, t_high)`` in :math:`[0, 1]`: guide only at diffusion times in that
            interval and sample the conditional model elsewhere (Kynkäänniemi et al.,
            2024). ``None``: guide at every step.
        precision
            ``"float32"``, or ``"bfloat16"``: the networks' matrix products in bf16, as
            under ``torch.autocast``, which pays only where the hardware computes bf16
            natively (docs "Performance"); the ODE's state, the softmax and the draws stay
            in float32 and float64.

        Returns
        -------
        AnnData of integer counts in ``X`` (CSR) and ``layers["counts"]``, the training
        genes, ``obs[labels_key]`` (the requested labels, in training order),
        ``obs["synthetic"] = True``, every choice in ``uns["scldiff"]``, and obs names
        ``synthetic-{token}-{i}`` that differ between calls drawing different cells.
        """
        self._check_if_trained(warn=False)
        sampling, library_size, batch_size = self._generation_settings(
            guidance_scale, sampler, n_steps, batch_size, precision, library_size,
            guidance_interval)
        if labels is None and n_samples is None:
            n_samples = len(self.train_indices_)
        codes = resolve_generation_labels(labels, n_samples, self.label_categories,
                                          np.asarray(self.label_proportions_),
                                          self.is_conditional)
        seed = resolve_seed(seed)
        blocks, computed_in = self._draw_in_precision(
            precision, codes, batch_size, np.random.SeedSequence(seed), progress_bar,
            library_size, sampling)
        return self._counts_anndata(blocks, codes, "synthetic", {
            "seed": seed, **sampling,
            "guidance_interval": list(sampling["guidance_interval"] or (0.0, 1.0)),
            "batch_size": int(batch_size), "library_size": library_size,
            "precision": computed_in})

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
        if isinstance(guidance_scale, bool) or not isinstance(
                guidance_scale, (int, float, np.integer, np.floating)) \
                or not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got "
                             f"{guidance_scale!r}.")
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
            batch_size = default_generation_batch(self.device, self.summary_stats["n_vars"])
        sampling = {"guidance_scale": float(guidance_scale) if self.is_conditional else 1.0,
                    "sampler": sampler, "n_steps": int(n_steps or DEFAULT_STEPS[sampler]),
                    "guidance_interval": check_guidance_interval(guidance_interval)}
        return sampling, library_size, batch_size

    def _draw_batches(self, codes: np.ndarray, batch_size: int,
                      seed_sequence: np.random.SeedSequence, progress_bar: bool,
                      library_size: str, sampling: dict) -> list[sp.csr_matrix]:
        """The counts of cells of label codes ``codes``, ``batch_size`` at a time: latents
        (``sampling``: :meth:`~scldiff.module.LapDDPMModule.sample_latents`' arguments),
        library sizes and counts. The latents and library sizes, and a GPU's counts, come
        from a torch generator, a CPU's counts from numpy, both seeded from
        ``seed_sequence``."""
        device = self.device
        torch_seed, numpy_seed = seed_sequence.spawn(2)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch_seed.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        counts_generator = generator if device.type != "cpu" else \
            np.random.default_rng(numpy_seed)
        blocks = []
        for start in track(range(0, codes.size, batch_size), description="Generating cells",
                           disable=not progress_bar, style="tqdm"):
            batch = torch.from_numpy(codes[start : start + batch_size]).to(device)
            z = self.module.sample_latents(batch, generator=generator, **sampling)
            library = self.library_model_.draw(library_size, z, batch, generator)
            blocks.append(self.module.decode_counts(z, library, counts_generator, batch))
        return blocks

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
            counts = counts[:, gene_columns(self.get_var_names(), gene_list)]
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
        counts, codes = self._posterior_draws(adata, indices, batch_size, seed, progress_bar)
        synth = self._counts_anndata([counts], codes, "posterior",
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
        entry's posterior, with its own library size; and the entries' label codes."""
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
        codes = collator.labels[indices]
        self.module.eval()
        counts = self.module.decode_counts(z.to(self.device), library.to(self.device), rng,
                                           torch.from_numpy(codes).to(self.device))
        return counts, codes

    def _counts_anndata(self, blocks: list[sp.csr_matrix], codes: np.ndarray, prefix: str,
                        provenance: dict, name_parts: tuple = ()) -> AnnData:
        """The AnnData of drawn counts: ``X`` and ``layers["counts"]`` (CSR, sharing no
        memory, so that normalising ``X`` in place leaves the counts), the training genes,
        ``obs[labels_key]`` from the label codes (categories that no cell has dropped, so
        that ``sc.tl.rank_genes_groups`` takes it), ``obs["synthetic"]`` and
        ``uns["scldiff"]``."""
        n_genes = self.summary_stats["n_vars"]
        x = sp.vstack(blocks, format="csr") if len(blocks) > 1 else \
            blocks[0] if blocks else sp.csr_matrix((0, n_genes), dtype=np.float32)
        obs = pd.DataFrame(index=_obs_names(prefix, codes.size, codes, provenance,
                                            *name_parts))
        if self.is_conditional:
            obs[self.labels_key] = pd.Categorical.from_codes(
                codes, categories=self.label_categories).remove_unused_categories()
        obs["synthetic"] = True
        var = pd.DataFrame(index=pd.Index(np.asarray(self.get_var_names(), dtype=str)))
        uns = {"scldiff": {"model": type(self).__name__, "scldiff_version": __version__,
                           "scvi_tools_version": self.registry_.get("scvi_version", ""),
                           "torch_version": str(torch.__version__),
                           "likelihood": self.module.likelihood,
                           "labels_key": self.labels_key or "", **provenance}}
        return AnnData(X=x, obs=obs, var=var, layers={"counts": x.copy()}, uns=uns)
