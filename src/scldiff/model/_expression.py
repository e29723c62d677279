"""``get_latent_representation()`` and ``get_normalized_expression()``: what the trained
encoder and decoder say about given cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ._validation import check_positive, gene_columns, resolve_seed


class ExpressionMixin:
    """:meth:`get_latent_representation` and :meth:`get_normalized_expression` of
    :class:`~scldiff.LapDDPM`."""

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: np.ndarray | None = None,
        batch_size: int = 512,
        progress_bar: bool = False,
    ) -> np.ndarray:
        """Posterior mean of each cell's latent, encoded on the full cell graph.

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells to encode (default: all).
        batch_size
            Seed cells per encoding batch.
        progress_bar
            Show a progress bar.

        Returns
        -------
        ``(n_cells, n_latent)`` array.
        """
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        indices = self._check_indices(adata, indices)
        mean, _ = self._posterior(self._collator(adata), indices, batch_size, progress_bar)
        return mean.numpy()

    @torch.no_grad()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: np.ndarray | None = None,
        gene_list: list[str] | None = None,
        library_size: float = 1.0,
        n_samples: int = 1,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool = False,
        seed: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        r"""The decoder's expected expression of each cell, per unit of library size, as
        scVI's: :math:`E[x_g \mid z] / \ell`, which is :math:`\rho_g` for the NB and
        :math:`(1 - \pi_g)\rho_g` (renormalised to sum to 1) for the ZINB, times
        ``library_size``.

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells (default: all).
        gene_list
            Genes to return (default: all).
        library_size
            Scale of the result: 1 gives fractions of the library, 1e4 counts per 10,000.
        n_samples
            1: decode the posterior mean of each cell's latent; more: decode that many
            draws :math:`z \sim q(z \mid x)`.
        batch_size
            Seed cells per encoding batch (default 512).
        return_mean
            With ``n_samples > 1``, the mean over the draws; else every draw.
        return_numpy
            Return an array instead of a DataFrame (a DataFrame needs one draw per cell).
        seed
            Seed of the draws (``None``: from ``scvi.settings.seed``).

        Returns
        -------
        ``(n_cells, n_genes)`` DataFrame (cells by obs name, genes by name), or an array;
        ``(n_samples, n_cells, n_genes)`` with ``n_samples > 1`` and ``return_mean=False``.
        """
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        indices = self._check_indices(adata, indices)
        genes = np.asarray(self.get_var_names(), dtype=str)
        columns = gene_columns(genes, gene_list)
        check_positive("n_samples", n_samples)
        collator = self._collator(adata)
        mean, logvar = self._posterior(collator, indices, batch_size or 512)
        codes = self.module.categories(
            torch.from_numpy(collator.attributes[indices]).to(self.device))
        generator = torch.Generator().manual_seed(resolve_seed(seed))
        self.module.eval()
        draws = []
        for _ in range(n_samples):
            z = mean if n_samples == 1 else \
                mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
            draws.append(self._expected_fractions(z, codes, columns) * library_size)
        result = np.stack(draws) if n_samples > 1 else draws[0]
        if n_samples > 1 and return_mean:
            result = result.mean(0)
        if return_numpy or result.ndim == 3:
            return result
        return pd.DataFrame(result, index=adata.obs_names[indices], columns=genes[columns])

    def _expected_fractions(self, z: torch.Tensor, codes: torch.Tensor,
                            columns: np.ndarray, chunk: int = 1024) -> np.ndarray:
        """:math:`E[x \\mid z] / \\ell` for latents ``z`` and categorical codes ``codes``
        (``(n, n_categorical)``), the genes ``columns``, ``chunk``
        cells at a time (the decoder's dense output is ``(cells, all genes)``)."""
        out = []
        for start in range(0, z.shape[0], chunk):
            params = self.module.decoder(z[start:start + chunk].to(self.device),
                                         codes[start:start + chunk])
            scale, kept = params.scale_and_kept()
            fractions = scale if kept is None else scale * kept
            out.append(fractions[:, torch.from_numpy(columns).to(fractions.device)].cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, columns.size), np.float32)
