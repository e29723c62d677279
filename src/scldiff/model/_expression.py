"""Encoding cells on the graph (the posteriors every method starts from),
``get_latent_representation()`` and ``get_normalized_expression()``: what the trained
encoder and decoder say about given cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.utils import track

from ..graph import SubgraphSampler
from ..module import BATCH_KEYS
from ..train import SubgraphCollator, SubgraphDataModule
from ._attributes import attribute_rows
from ._constants import REGISTRY_KEYS
from ._validation import check_positive, gene_columns, resolve_seed


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class ExpressionMixin:
    """The posteriors of given cells, :meth:`get_latent_representation` and
    :meth:`get_normalized_expression` of :class:`~scldiff.LapDDPM`."""

    def _collator(self, adata: AnnData | None = None) -> SubgraphCollator:
        """The subgraph collator of an AnnData's registered counts, attribute rows, LPE and
        graph (default: the model's)."""
        manager = self.get_anndata_manager(self.adata if adata is None else adata,
                                           required=True)
        # backed: read per minibatch; paired data: the genes' columns
        counts = self._gene_counts(manager.get_from_registry(REGISTRY_KEYS.X_KEY))
        rows = attribute_rows(manager, self.attributes)
        lpe = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LPE_KEY), dtype=np.float32)
        sampler = SubgraphSampler(manager.get_from_registry(REGISTRY_KEYS.GRAPH_KEY),
                                  n_hops=self.module.encoder.n_hops)
        return SubgraphCollator(counts, rows, lpe, sampler)

    @torch.inference_mode()
    def _posterior(self, collator: SubgraphCollator, indices: np.ndarray,
                   batch_size: int = 512, progress_bar: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means and log-variances of the given cells on the full graph.

        Each cell's expression is read and projected once, in a sequential pass over the
        rows (a backed matrix is read in order, block by block); the subgraph batches then
        gather the projections of their nodes. For a few cells (under 1/20 of all), each
        batch reads its subgraph's rows instead of the whole matrix.
        """
        self.module.eval()
        device = self.device
        indices = np.asarray(indices, dtype=np.int64)
        data = SubgraphDataModule(collator, indices, [], batch_size)
        if indices.size * 20 < collator.library.size:
            out = [self.module.inference(**self.module._get_inference_input(
                _to_device(batch, device)), use_mean=True)
                for batch in data._loader(indices, shuffle=False)]
        else:
            projection, start = None, 0
            for block in collator.input_blocks():
                h = self.module.project_nodes(
                    torch.from_numpy(block.indptr.astype(np.int64)).to(device),
                    torch.from_numpy(block.indices.astype(np.int64)).to(device),
                    torch.from_numpy(block.data).to(device)).cpu()
                if projection is None:  # (n_cells, n_hidden), filled block by block
                    projection = h.new_empty((collator.library.size, h.shape[1]))
                projection[start : start + h.shape[0]] = h
                start += h.shape[0]
            out = []
            for batch in track(data.inference_loader(), description="Encoding cells",
                               disable=not progress_bar, style="tqdm"):
                nodes = batch.pop(BATCH_KEYS.NODES)
                n_seed = batch.pop(BATCH_KEYS.ATTRIBUTES).shape[0]
                out.append(self.module.inference(
                    None, None, None, **_to_device(batch, device), n_seed=n_seed,
                    use_mean=True, node_projection=projection[nodes].to(device)))
        return (torch.cat([o["qz_mean"].cpu() for o in out]),
                torch.cat([o["qz_logvar"].cpu() for o in out]))

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
        genes = self.gene_names
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
