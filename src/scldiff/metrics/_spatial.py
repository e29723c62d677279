"""Spatial structure of a generated section against the real one, on the real section's
neighbourhood graph: Moran's I per gene, domain recovery, graph-Fourier spectra."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ._evaluate import _log_normalize_sparse


def _lognorm(counts) -> sp.csr_matrix:
    return _log_normalize_sparse(sp.csr_matrix(counts, dtype=np.float64))


def morans_i(counts, graph) -> np.ndarray:
    r"""Moran's I of every gene's log-normalised expression (1e4, log1p) on ``graph``
    (``(n_spots, n_spots)`` weights :math:`w`): :math:`I = \frac{n}{W}\frac{\sum_{ij}
    w_{ij} (x_i - \bar x)(x_j - \bar x)}{\sum_i (x_i - \bar x)^2}`, :math:`W = \sum_{ij}
    w_{ij}`, computed by :func:`scanpy.metrics.morans_i`; NaN for a gene constant across
    spots."""
    import scanpy as sc

    x = _lognorm(counts)
    constant = np.asarray(x.max(0).toarray()).ravel() == np.asarray(x.min(0).toarray()).ravel()
    values = np.full(x.shape[1], np.nan)
    keep = np.flatnonzero(~constant)
    if keep.size:
        values[keep] = sc.metrics.morans_i(sp.csr_matrix(graph), x[:, keep].T.tocsr())
    return values


def moran_agreement(real, generated, graph, n_genes: int = 200) -> dict[str, float]:
    """Moran's I of real and generated spots (same spots, same genes) on the real
    section's ``graph``, over the ``n_genes`` genes of highest real Moran's I (the spatially
    variable genes): Pearson correlation across those genes, mean absolute difference, and
    each section's mean."""
    real_i, gen_i = morans_i(real, graph), morans_i(generated, graph)
    if real_i.shape != gen_i.shape:
        raise ValueError("real and generated must have the same genes.")
    ranked = np.flatnonzero(np.isfinite(real_i))
    genes = ranked[np.argsort(-real_i[ranked], kind="stable")][:n_genes]
    a, b = real_i[genes], np.nan_to_num(gen_i[genes], nan=0.0)
    return {"Moran's I correlation": float(np.corrcoef(a, b)[0, 1]),
            "Moran's I MAD": float(np.abs(a - b).mean()),
            "Moran's I (real)": float(a.mean()), "Moran's I (generated)": float(b.mean())}


def domain_ari(counts, domains, n_pcs: int = 30, random_state: int = 0) -> float:
    """Adjusted Rand index between the real domains and k-means clusters (k = the number
    of domains, 10 starts) of the spots' log-normalised expression in ``n_pcs`` principal
    components; spots without a domain (NaN) are left out. The same on real spots is the
    figure a generated section should reach."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD
    from sklearn.metrics import adjusted_rand_score

    domains = np.asarray(domains, dtype=object)
    known = np.array([d is not None and d == d for d in domains])
    x = _lognorm(counts)[known]
    x = x.toarray() - np.asarray(x.mean(0)).ravel()
    k = len(set(domains[known]))
    n_comps = int(min(n_pcs, min(x.shape) - 1))
    pcs = TruncatedSVD(n_comps, random_state=random_state).fit_transform(x)
    clusters = KMeans(k, n_init=10, random_state=random_state).fit_predict(pcs)
    return float(adjusted_rand_score(domains[known].astype(str), clusters))


def _fourier_basis(graph, n_modes: int) -> np.ndarray:
    r"""``(n_spots, n_modes)``: the trivial eigenvector :math:`\propto \sqrt{d}` of the
    normalised Laplacian, then its ``n_modes - 1`` lowest non-trivial ones."""
    from ..graph import laplacian_positional_encoding

    degree = np.asarray(sp.csr_matrix(graph).sum(1)).ravel()
    trivial = np.sqrt(degree / degree.sum())[:, None]
    modes, _ = laplacian_positional_encoding(graph, n_lpe=n_modes - 1)
    return np.concatenate([trivial, modes.astype(np.float64)], axis=1)


def _spectrum(counts, basis: np.ndarray, genes) -> np.ndarray:
    x = _lognorm(counts)
    x = x if genes is None else x[:, genes]
    x = x.toarray() - np.asarray(x.mean(0)).ravel()
    share = ((basis.T @ x) ** 2).sum(1) / float((x**2).sum())
    return np.append(share, max(0.0, 1.0 - share.sum()))


def graph_fourier_spectrum(counts, graph, n_modes: int = 50, genes=None) -> np.ndarray:
    r"""Share of the (per gene centred) log-normalised expression's energy on each of the
    ``n_modes`` lowest eigenvectors :math:`u_k` of the graph's normalised Laplacian, and
    in the rest: :math:`s_k = \sum_g (u_k^\top x_g)^2 / \sum_g \lVert x_g\rVert^2`, then
    :math:`1 - \sum_k s_k`; ``(n_modes + 1,)``, summing to 1. Smooth (spatially
    autocorrelated) expression puts its energy on the low modes."""
    return _spectrum(counts, _fourier_basis(graph, n_modes), genes)


def spectral_mismatch(real, generated, graph, n_modes: int = 50, genes=None) -> float:
    r"""Total variation distance (:math:`\tfrac12\sum_k |s_k - s'_k|`, in [0, 1]) between
    the :func:`graph_fourier_spectrum` of real and generated spots on the real section's
    ``graph``: 0 when the generated expression spreads its energy over the tissue's modes as
    the real one does."""
    basis = _fourier_basis(graph, n_modes)
    a, b = _spectrum(real, basis, genes), _spectrum(generated, basis, genes)
    return float(0.5 * np.abs(a - b).sum())
