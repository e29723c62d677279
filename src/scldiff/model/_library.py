"""The library-size model of generated cells: fitted to the training cells, drawn given each
generated cell's label and latent, saved as plain numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

LibrarySize = Literal["latent", "label"]
LIBRARY_SIZES: tuple[str, ...] = ("latent", "label")
# points of each quantile function kept (evenly spaced probabilities from 0 to 1)
_N_QUANTILES = 101


def interpolated_draws(quantiles: Tensor, generator: torch.Generator | None = None
                       ) -> Tensor:
    """One draw per row of ``quantiles`` (``(n, q)``, values at evenly spaced probabilities
    from 0 to 1) from the distribution whose quantile function is linear between them: the
    interpolated empirical distribution, by inverse transform."""
    position = torch.rand(quantiles.shape[0], generator=generator, device=quantiles.device,
                          dtype=quantiles.dtype) * (quantiles.shape[1] - 1)
    index = position.long().clamp_max(quantiles.shape[1] - 2)
    below = quantiles.gather(1, index[:, None])[:, 0]
    above = quantiles.gather(1, index[:, None] + 1)[:, 0]
    return below + (position - index) * (above - below)


@dataclass
class LibrarySizeModel:
    r"""Library sizes (total counts) of generated cells, in two modes.

    ``"latent"``: given the cell's latent :math:`z` and label :math:`c`, :math:`\log\ell =
    a_c + b^\top z + r`, one intercept per label, one slope vector shared by all (the
    within-label regression), and the residual :math:`r` drawn from label :math:`c`'s
    empirical residuals, clipped to the training cells' range. A cell's sequencing depth
    follows its state inside a cell type, and drawing it independently of the latent loses
    that coupling. ``"label"``: from the label's training cells alone, independently of the
    latent. Both draw from interpolated empirical quantile functions: log library sizes are
    skewed, so a log-normal fit would put the median off.

    A *group* is a combination of categorical attributes seen in training; the last group has
    no cells and stands for combinations never seen. Those get :math:`\log\ell = \mu +
    \sum_a \alpha_{a, c_a} + r`, the additive effects of their attributes' values fitted to
    all training cells by least squares, and :math:`r` drawn from the cells' residuals
    around their own group's mean: the library size is composed from the attributes, as the
    cells are.

    Attributes
    ----------
    log_quantiles
        ``(n_labels, 101)`` quantile function of each label's log library size.
    coef
        ``(n_latent,)`` slopes :math:`b`.
    intercept
        ``(n_labels,)`` intercepts :math:`a_c`.
    residual_quantiles
        ``(n_labels, 101)`` quantile function of each label's residuals.
    log_range
        ``(2,)`` smallest and largest training log library size.
    effects
        ``(1 + sum(effect_sizes),)`` :math:`\mu` and the additive effects
        :math:`\alpha_{a, c}` of each attribute's categories, in order.
    effect_sizes
        ``(n_attributes,)`` number of categories of each categorical attribute.
    centred_quantiles
        ``(101,)`` quantile function of the log library sizes minus their group's mean.
    """

    log_quantiles: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    residual_quantiles: np.ndarray
    log_range: np.ndarray
    effects: np.ndarray
    effect_sizes: np.ndarray
    centred_quantiles: np.ndarray

    @classmethod
    def fit(cls, library: np.ndarray, labels: np.ndarray, n_labels: int, z: np.ndarray,
            z_var: np.ndarray, n_points: int = 8, codes: np.ndarray | None = None,
            n_categories: list[int] | None = None) -> LibrarySizeModel:
        r"""Fit to the training cells: library sizes ``library`` (``(n,)``, positive), label
        codes ``labels`` (``(n,)``) and the posterior means ``z`` and variances ``z_var``
        (``(n, n_latent)``) of their latents, in float64.

        The slopes come from the within-label centred data. The posterior variances join
        the normal equations, :math:`\sum_i \operatorname{diag}(v_i)`, so that the fit is
        the one to latents drawn from the posteriors, as the diffusion's training data are:
        it gives :math:`E[\log \ell \mid z]` for such latents. The residuals are those of
        such draws: each cell's :math:`e_i = y_i - a_c - b^\top z_i` minus :math:`s_i \xi_k`,
        with :math:`s_i^2 = b^\top \operatorname{diag}(v_i)\, b` and :math:`\xi_k` the
        ``n_points`` standard normal quantiles at :math:`(k - \tfrac12)/n`, so the fit is
        deterministic. A label without cells gets the quantiles and the intercept of all cells,
        one with a single cell the residual quantiles of all cells. ``codes`` (``(n,
        n_attributes)``) and ``n_categories``: the cells' categorical attributes, for the
        additive effects of unseen combinations.
        """
        from scipy.stats import norm

        y = np.log(np.asarray(library, dtype=np.float64).reshape(-1))
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        z, z_var = np.asarray(z, dtype=np.float64), np.asarray(z_var, dtype=np.float64)
        counts = np.bincount(labels, minlength=n_labels)
        present = counts > 0
        z_mean = np.zeros((n_labels, z.shape[1]))
        np.add.at(z_mean, labels, z)
        y_mean = np.bincount(labels, weights=y, minlength=n_labels)
        z_mean[present] /= counts[present, None]
        y_mean[present] /= counts[present]
        zc, yc = z - z_mean[labels], y - y_mean[labels]
        gram = zc.T @ zc + np.diag(z_var.sum(0))
        coef = np.linalg.lstsq(gram, zc.T @ yc, rcond=None)[0]
        normal = norm.ppf((np.arange(n_points) + 0.5) / n_points)
        residual = (yc - zc @ coef)[:, None] - np.sqrt(z_var @ coef**2)[:, None] * normal
        intercept = y_mean - z_mean @ coef
        intercept[~present] = y.mean() - z.mean(0) @ coef
        sizes = np.asarray(n_categories or [], dtype=np.int64)
        design = [np.ones((y.size, 1))] + [
            np.eye(n)[np.asarray(codes[:, a], dtype=np.int64)] for a, n in enumerate(sizes)]
        effects = np.linalg.lstsq(np.concatenate(design, 1), y, rcond=None)[0]
        return cls(log_quantiles=_quantiles(y[:, None], labels, counts, 1),
                   coef=coef, intercept=intercept,
                   residual_quantiles=_quantiles(residual, labels, counts, 2),
                   log_range=np.array([y.min(), y.max()]), effects=effects,
                   effect_sizes=sizes.astype(np.float64),
                   centred_quantiles=np.quantile(yc, np.linspace(0.0, 1.0, _N_QUANTILES)))

    def draw(self, mode: LibrarySize, z: Tensor, labels: Tensor,
             generator: torch.Generator | None = None, codes: Tensor | None = None) -> Tensor:
        """One library size per cell, ``(n,)`` float32 on ``z``'s device, for latents ``z``
        (``(n, n_latent)``) and group codes ``labels``, from ``generator``; cells of the last
        group (unseen combinations) by the additive effects of their categorical codes
        ``codes`` (``(n, n_attributes)``), when given."""
        labels = labels.reshape(-1).long().to(z.device)
        tensor = {name: torch.as_tensor(value, dtype=torch.float32, device=z.device)
                  for name, value in asdict(self).items()}
        if mode == "label":
            log_library = interpolated_draws(tensor["log_quantiles"][labels], generator)
        elif mode == "latent":
            residual = interpolated_draws(tensor["residual_quantiles"][labels], generator)
            log_library = (tensor["intercept"][labels] + z.float() @ tensor["coef"]
                           + residual).clamp(*self.log_range.tolist())
        else:
            raise ValueError(f"library_size must be one of {LIBRARY_SIZES}, got {mode!r}.")
        unseen = labels == self.intercept.shape[0] - 1
        if codes is not None and self.effect_sizes.size and bool(unseen.any()):
            codes = codes.reshape(labels.shape[0], -1)[unseen].long().to(z.device)
            offsets = np.concatenate([[1], 1 + np.cumsum(self.effect_sizes[:-1])]).astype(int)
            mean = tensor["effects"][0] + tensor["effects"][
                codes + torch.as_tensor(offsets, device=z.device)].sum(1)
            quantiles = tensor["centred_quantiles"].expand(int(unseen.sum()), -1)
            log_library = log_library.clone()
            log_library[unseen] = (mean + interpolated_draws(quantiles, generator)).clamp(
                *self.log_range.tolist())
        return log_library.exp()

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for a model's JSON file."""
        return {name: value.tolist() for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values, n_latent: int, n_labels: int) -> LibrarySizeModel:
        """The model :meth:`to_dict` wrote; ``ValueError`` unless it holds finite numbers of
        the right shapes, each quantile function non-decreasing and the range ordered."""
        shapes = {"log_quantiles": (n_labels, None), "coef": (n_latent,),
                  "intercept": (n_labels,), "residual_quantiles": (n_labels, None),
                  "log_range": (2,), "effects": (None,), "effect_sizes": (None,),
                  "centred_quantiles": (None,)}
        if not isinstance(values, dict) or set(values) != set(shapes):
            raise ValueError(f"the library-size model must have the fields {sorted(shapes)}.")
        arrays = {}
        for name, shape in shapes.items():
            try:
                array = np.asarray(values[name], dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"its {name} are not numbers.") from None
            if array.ndim != len(shape) or any(want is not None and want != got for want, got
                                               in zip(shape, array.shape, strict=True)):
                raise ValueError(f"its {name} have shape {array.shape}, not {shape}.")
            if not np.isfinite(array).all():
                raise ValueError(f"its {name} are not all finite.")
            arrays[name] = array
        for name in ("log_quantiles", "residual_quantiles", "centred_quantiles"):
            rows = np.atleast_2d(arrays[name])
            if rows.shape[1] < 2 or (np.diff(rows, axis=1) < 0).any():
                raise ValueError(f"its {name} are not non-decreasing rows of 2 or more.")
        if arrays["effects"].size != 1 + arrays["effect_sizes"].sum():
            raise ValueError("its effects do not match its effect_sizes.")
        if arrays["log_range"][0] > arrays["log_range"][1]:
            raise ValueError("its log_range is not ordered.")
        return cls(**arrays)


def _quantiles(values: np.ndarray, labels: np.ndarray, counts: np.ndarray, min_cells: int
               ) -> np.ndarray:
    """``(n_labels, 101)`` quantiles of the rows of ``values`` (``(n, k)``: ``k`` values per
    cell) of each label with at least ``min_cells`` cells; of all cells for the others."""
    grid = np.linspace(0.0, 1.0, _N_QUANTILES)
    out = np.tile(np.quantile(values, grid), (counts.size, 1))
    for code in np.flatnonzero(counts >= min_cells):
        out[code] = np.quantile(values[labels == code], grid)
    return out
