"""LapDDPM: the scvi-tools model class, the only layer that touches AnnData."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from typing import Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from lightning.pytorch.callbacks import ModelCheckpoint
from scvi import settings
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass
from scvi.train._trainrunner import _safe_load_logger_history
from scvi.utils import track

from .._autocast import autocast_dtype
from .._constants import ADATA_KEYS, BATCH_KEYS, REGISTRY_KEYS
from .._malloc import heap_kept
from .._matrix import is_in_memory
from .._version import __version__
from ..diffusion import DEFAULT_STEPS, SAMPLERS, check_guidance_interval
from ..graph import SubgraphSampler, knn_graph, laplacian_positional_encoding, pca_embedding
from ..module import LIKELIHOODS, PREDICTIONS, LapDDPMModule, LatentLibrary
from ..module._decoder import DISPERSIONS, Likelihood
from ..train import (
    PERTURBATIONS,
    STAGE_NAMES,
    LapDDPMTrainingPlan,
    LapDDPMTrainRunner,
    LatentDataModule,
    StageProgressBar,
    SubgraphCollator,
    SubgraphDataModule,
)
from ._fields import ObspField
from ._serialization import (
    ADATA_FILE,
    ModelFileError,
    read_model_dir,
    resolve_model_dir,
    write_model_dir,
)
from ._validation import (
    check_counts,
    check_graph_parameters,
    check_labels,
    resolve_generation_labels,
)

logger = logging.getLogger(__name__)

LIBRARY_SIZES: tuple[str, ...] = ("latent", "label", "diffusion")

_GRAPH_VERSION = 1
# Attributes saved with the model besides init params and registry (all JSON-serialisable).
_SAVED_ATTRIBUTES = (
    "is_trained_", "history_", "train_indices_", "validation_indices_", "test_indices_",
    "library_log_mean_", "library_log_std_", "label_proportions_", "library_log_quantiles_",
    "library_latent_",
)
# fields of library_latent_ (LatentLibrary's tensors, as lists) and their lengths
_LATENT_LIBRARY_FIELDS = ("coef", "intercept", "residual_quantiles", "log_range")
# points of the quantile function of each label's log library size kept for generation
_LIBRARY_QUANTILES = 101


def _warn_backed_csc(adata: AnnData, layer: str | None) -> None:
    matrix = adata.X if layer is None else adata.layers[layer]
    if not is_in_memory(matrix) and getattr(matrix, "format", None) == "csc":
        warnings.warn(
            "The counts are a backed CSC matrix: every block of rows that setup and training "
            "read touches all of its columns, which is slow on a large file. Store them as "
            "CSR (adata.X = adata.X.tocsr() before write_h5ad) to read rows directly.",
            UserWarning, stacklevel=3)


def _check_latent_library(fit, n_latent: int, n_labels: int, dir_path: str) -> None:
    """Raise :class:`ModelFileError` unless ``fit`` (a loaded ``library_latent_``) is
    ``None`` or holds finite numbers of the right shapes: the residual quantiles of each
    label non-decreasing, the log range ordered."""
    if fit is None:
        return
    ok = isinstance(fit, dict) and set(fit) == set(_LATENT_LIBRARY_FIELDS)
    if ok:
        try:
            values = {k: np.asarray(fit[k], dtype=np.float64) for k in _LATENT_LIBRARY_FIELDS}
        except (TypeError, ValueError):
            ok = False
        else:
            quantiles = values["residual_quantiles"]
            ok = (values["coef"].shape == (n_latent,)
                  and values["intercept"].shape == (n_labels,)
                  and values["log_range"].shape == (2,)
                  and quantiles.ndim == 2 and quantiles.shape[0] == n_labels
                  and quantiles.shape[1] >= 2
                  and all(np.isfinite(v).all() for v in values.values())
                  and bool((np.diff(quantiles, axis=1) >= 0).all())
                  and values["log_range"][0] <= values["log_range"][1])
    if not ok:
        raise ModelFileError(
            f"{dir_path}: library_latent_ in its model.json is not the regression of the "
            f"library size on the latent (coef: {n_latent} numbers, intercept: {n_labels}, "
            f"residual_quantiles: {n_labels} non-decreasing rows, log_range: 2, all finite); "
            "the file is damaged. Save the model again from the trained one.")


def _sample_quantiles(quantiles: np.ndarray, codes: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """One draw per cell from the distribution whose quantile function is linear between
    ``quantiles[code]`` (values at evenly spaced probabilities from 0 to 1): the
    interpolated empirical distribution of the training values, by inverse transform."""
    position = rng.random(codes.size) * (quantiles.shape[1] - 1)
    low = np.minimum(position.astype(np.int64), quantiles.shape[1] - 2)
    rows = quantiles[codes]
    below = np.take_along_axis(rows, low[:, None], 1)[:, 0]
    above = np.take_along_axis(rows, low[:, None] + 1, 1)[:, 0]
    return below + (position - low) * (above - below)


def _graph_params(layer: str | None, n_obs: int, n_neighbors: int, n_pcs: int,
                  n_lpe: int) -> dict:
    return {"version": _GRAPH_VERSION, "source": "X" if layer is None else f"layers/{layer}",
            "n_obs": n_obs, "n_neighbors": n_neighbors, "n_pcs": n_pcs, "n_lpe": n_lpe}


def _ensure_graph(adata: AnnData, layer: str | None, n_neighbors: int, n_pcs: int,
                  n_lpe: int) -> None:
    """Build the k-NN graph and LPE in ``adata`` unless a matching one is already there."""
    params = _graph_params(layer, adata.n_obs, n_neighbors, n_pcs, n_lpe)
    stored = adata.uns.get(ADATA_KEYS.GRAPH_PARAMS)
    if (
        isinstance(stored, dict)
        and {k: (v.item() if isinstance(v, np.generic) else v) for k, v in stored.items()}
        == params
        and ADATA_KEYS.GRAPH in adata.obsp
        and ADATA_KEYS.LPE in adata.obsm
        and adata.obsm[ADATA_KEYS.LPE].shape == (adata.n_obs, n_lpe)
    ):
        logger.info("Reusing the cell graph stored in the AnnData.")
        return
    counts = adata.X if layer is None else adata.layers[layer]  # may be backed: read in blocks
    seed = settings.seed if settings.seed is not None else 0
    embedding = pca_embedding(counts, n_pcs=n_pcs, random_state=seed)
    graph = knn_graph(embedding, n_neighbors=n_neighbors, random_state=seed)
    if n_lpe > 0:
        lpe, _ = laplacian_positional_encoding(graph, n_lpe=n_lpe, random_state=seed)
    else:
        lpe = np.zeros((adata.n_obs, 0), dtype=np.float32)
    adata.obsp[ADATA_KEYS.GRAPH] = graph
    adata.obsm[ADATA_KEYS.LPE] = lpe
    adata.uns[ADATA_KEYS.GRAPH_PARAMS] = params


# bytes per (cell, gene) entry that generating a batch needs on a GPU at its peak: the
# decoder's outputs, the sampler's bound and uniforms, masks (float32/int32; an estimate
# with room to spare, the measured peak is in docs "Scaling")
_GENERATION_BYTES_PER_ENTRY = 48


# generate()'s precisions: the dtype of the networks' matrix products under autocast
_PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_generation_batch(device: torch.device, n_genes: int) -> int:
    """``generate()``'s default cells per batch: 4096 on a CPU (the decoder works in
    chunks of 256 there anyway); on a GPU as many as fit in an eighth of its memory,
    in multiples of 1024 from 1024 to 65,536. The device's total memory, not its free
    memory, so that the batches, and with them the counts of a seed, do not depend on what
    else runs on it."""
    if device.type != "cuda":
        return 4096
    total = torch.cuda.get_device_properties(device).total_memory
    cells = total // 8 // (max(n_genes, 1) * _GENERATION_BYTES_PER_ENTRY)
    return int(min(max(cells // 1024 * 1024, 1024), 65_536))


# Default lengths of the two stages in optimisation steps (see LapDDPM.train). Stage A
# was 1,000 steps until twice that was measured closer to held-out cells on both benchmark
# datasets (docs "Benchmarks").
STAGE_A_STEPS = 2_000
STAGE_B_STEPS = 4_000


def _to_device(batch: dict, device: torch.device) -> dict:
    """A minibatch's tensors on ``device``; its other entries (host-side counts such as
    ``BATCH_KEYS.SEED_EDGES``) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _epochs_for_steps(steps: int, n_cells: int, batch_size: int) -> int:
    """Epochs giving about ``steps`` minibatches (at least one epoch)."""
    per_epoch = max(1, math.ceil(n_cells / batch_size))
    return max(1, round(steps / per_epoch))


def _read_checkpoint(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The ``scldiff`` entry and module weights of a Lightning checkpoint, without pickle.

    ``torch.load(weights_only=True)`` rebuilds tensors and plain containers only, so a
    checkpoint carrying code is refused rather than run.
    """
    if not os.path.isfile(path):
        raise ValueError(f"ckpt_path {path!r} is not a file; pass a checkpoint written by "
                         "a ModelCheckpoint callback during train().")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means: refuse
        raise ModelFileError(
            f"{path} cannot be read as a plain checkpoint ({type(err).__name__}: {err}); "
            "checkpoints that need code to load are refused."
        ) from err
    meta = checkpoint.get("scldiff") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or meta.get("stage") not in ("A", "B") or not isinstance(
            meta.get("seed"), int):
        raise ModelFileError(f"{path} is not a checkpoint of LapDDPM.train().")
    prefix = "module."
    module_state = {k[len(prefix):]: v for k, v in checkpoint.get("state_dict", {}).items()
                    if k.startswith(prefix)}
    return meta, module_state


def _merge_history(old: dict | None, new: dict | None) -> dict:
    """Append a training run's per-epoch history to the model's, continuing the epochs."""
    old, new = dict(old or {}), dict(new or {})
    offset = max((int(frame.index.max()) + 1 for frame in old.values() if len(frame)),
                 default=0)
    for key, frame in new.items():
        frame = frame.copy()
        frame.index = np.arange(offset, offset + len(frame))
        frame.index.name = "epoch"
        old[key] = pd.concat([old[key], frame]) if key in old else frame
    return old


class LapDDPM(BaseModelClass):
    r"""Conditional graph latent diffusion model for scRNA-seq counts (LapDDPM, paper 001).

    A Chebyshev GNN encodes each cell from its expression and Laplacian positional
    encodings on a k-NN cell graph; a count decoder (NB, ZINB or Poisson with explicit
    library size) reconstructs it; a conditional diffusion model with classifier-free
    guidance learns the distribution of the latents. Training perturbs the graph's edge
    weights adversarially along its principal spectral mode.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Used by :meth:`load` to rebuild a model without data; leave ``None``.
    n_latent
        Latent dimension.
    n_hidden
        Hidden width of encoder and decoder.
    cheb_k
        Chebyshev filter size of each graph layer (K - 1 hops). With 1 the encoder sees
        each cell alone (and its positional encoding): it uses no edge, so it trains only
        with ``perturbation="none"``.
    n_cheb_layers
        Number of graph layers.
    likelihood
        ``"zinb"`` (zero-inflated negative binomial, default), ``"nb"``, ``"hurdle"``
        (hurdle negative binomial: a free probability of a nonzero count per cell and
        gene, the negative binomial truncated at zero above it) or ``"poisson"``.
        On PBMC3K the ZINB's posterior predictive is closer to held-out cells than the NB's
        (conditional MMD 0.622 vs 0.677, random-forest AUC 0.649 vs 0.659;
        ``benchmarks/``). The hurdle's zeros can be rarer than the negative binomial's:
        its decoded training cells are closer to real ones than the ZINB's (random-forest
        AUC 0.62 vs 0.66 on PBMC3K, 0.60 vs 0.63 on Zheng 2017), but its generated cells
        score as the ZINB's within the spread of seeds (``benchmarks/prior_gap.py``,
        ``benchmarks/quality.py``; ``docs/benchmarks.md``).
    dropout_rate
        Encoder dropout.
    score_hidden, score_blocks
        Width and depth of the ScoreNet. Width 128 scores as 256 does on the benchmarks
        and samples latents 2.3x faster (``benchmarks/scorenet_size.py``).
    beta_min, beta_max, t_min
        VP-SDE schedule, see :class:`scldiff.diffusion.VPSchedule`.
    library_size
        How generated cells get their library sizes (total counts). ``"latent"``
        (default): given the generated latent, from a linear regression of the training
        cells' log library sizes on their posteriors, with one intercept and the empirical
        residuals per label (:class:`~scldiff.module.LatentLibrary`), so that the
        depth follows the cell state within a label, as in real cells. ``"label"``: from
        the training cells' library sizes of the label, independently of the latent (their
        quantile function at 101 points, interpolated linearly). ``"diffusion"``: the log
        library size is diffused jointly with the latent. Against ``"label"``, the
        regression keeps the within-type coupling of depth and expression state (the
        generated cells' :func:`~scldiff.metrics.library_coupling` 0.76 and 0.79 against
        0.70 and 0.73, real cells 0.81, on PBMC3K and Zheng 2017); the distances and the
        classifier AUC score alike (docs "Benchmarks"). (Models saved before the
        quantiles were kept drew from a per-label log-normal fit, which put the median
        library 4–5% off on both benchmark datasets because the log library size is
        skewed; loaded, they still do.)
    dispersion
        ``"gene"`` (default): one inverse dispersion per gene, shared by all cells;
        ``"gene-label"``: one per gene and label (scVI's option of that name), for labelled
        models only. On the benchmark splits measured so far (PBMC3K and Zheng 2017, seed
        1), ``"gene-label"`` put the posterior predictive and the generated cells slightly
        farther from held-out cells (``benchmarks/prior_gap.py``, docs "Benchmarks").
    decoder_labels
        Give the decoder each cell's label (one-hot) beside its latent, as scVI's decoder
        takes its covariates. ``None`` (default): whenever the model has labels. Generated
        and posterior-predictive cells are decoded with the label they are drawn for, so
        the latent need not keep overlapping labels apart for the decoder to express them
        differently. On both benchmark datasets this brought the generated cells closer to
        held-out ones (conditional MMD 0.633 to 0.610 on PBMC3K and 0.172 to 0.165 on
        Zheng 2017, 3 splits; ``benchmarks/quality.py``, docs "Benchmarks"). Models saved
        before this option existed load with ``False``, as they were trained.
    encoder_labels
        Give the encoder each cell's label too, as a conditional VAE's encoder (a learned
        shift of the posterior per label; :class:`~scldiff.module.GraphEncoder`). Labelled
        models only. Default ``False``.
    prediction
        What the ScoreNet learns to predict: ``"v"`` (default), the velocity
        :math:`\alpha_t\epsilon - \sigma_t z_0`, or ``"epsilon"``, the noise (paper 001).
        With the noise, the deterministic samplers gave latents about twice as spread out
        as the training cells' posteriors (docs "Benchmarks": the clean latent implied by a
        noise prediction amplifies its error by :math:`\sigma_t/\alpha_t`, up to 150, at
        high noise). Models saved before this option existed load with ``"epsilon"``, as
        they were trained.

    Examples
    --------
    >>> adata = scldiff.datasets.pbmc3k()
    >>> sc.pp.filter_genes(adata, min_counts=1)
    >>> scldiff.LapDDPM.setup_anndata(adata, labels_key="cell_type")
    >>> model = scldiff.LapDDPM(adata)
    >>> model.train()
    >>> synth = model.generate(labels={"B cells": 300, "Megakaryocytes": 50}, seed=0)
    """

    _module_cls = LapDDPMModule
    _training_plan_cls = LapDDPMTrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
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
        library_size: Literal["latent", "label", "diffusion"] = "latent",
        dispersion: Literal["gene", "gene-label"] = "gene",
        decoder_labels: bool | None = None,
        encoder_labels: bool = False,
        prediction: Literal["v", "epsilon"] = "v",
    ):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}.")
        if library_size not in LIBRARY_SIZES:
            raise ValueError(f"library_size must be one of {LIBRARY_SIZES}, got "
                             f"{library_size!r}.")
        if dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}.")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}.")
        super().__init__(adata, registry)
        if dispersion == "gene-label" and not self.is_conditional:
            raise ValueError('dispersion="gene-label" needs labels: set up the AnnData with '
                             'setup_anndata(adata, labels_key=...), or use dispersion="gene".')
        if decoder_labels and not self.is_conditional:
            raise ValueError("decoder_labels=True needs labels: set up the AnnData with "
                             "setup_anndata(adata, labels_key=...), or leave it unset.")
        if encoder_labels and not self.is_conditional:
            raise ValueError("encoder_labels=True needs labels: set up the AnnData with "
                             "setup_anndata(adata, labels_key=...), or leave it False.")
        if decoder_labels is None:
            decoder_labels = self.is_conditional
        stats = self.summary_stats
        self.module = self._module_cls(
            n_input=stats["n_vars"],
            n_labels=stats["n_labels"],
            n_lpe=stats.get("n_lpe", 0),
            lpe_scale=math.sqrt(stats["n_cells"]),
            n_latent=n_latent,
            n_hidden=n_hidden,
            cheb_k=cheb_k,
            n_cheb_layers=n_cheb_layers,
            likelihood=likelihood,
            dropout_rate=dropout_rate,
            score_hidden=score_hidden,
            score_blocks=score_blocks,
            beta_min=beta_min,
            beta_max=beta_max,
            t_min=t_min,
            diffuse_library=library_size == "diffusion",
            dispersion=dispersion,
            decoder_labels=decoder_labels,
            encoder_labels=encoder_labels,
            prediction=prediction,
        )
        self.library_log_mean_: list[float] | None = None
        self.library_log_std_: list[float] | None = None
        self.label_proportions_: list[float] | None = None
        self.library_log_quantiles_: list[list[float]] | None = None
        self.library_latent_: dict[str, list[float]] | None = None
        self.library_size = library_size
        self._model_summary_string = (
            f"LapDDPM with n_latent={n_latent}, likelihood={likelihood!r}, "
            f"{stats['n_labels'] if self.is_conditional else 0} labels, "
            f"Chebyshev K={cheb_k} x {n_cheb_layers} layer(s), {stats.get('n_lpe', 0)} LPE."
        )
        self.init_params_ = self._get_init_params(locals())

    # ----------------------------------------------------------------------- setup
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        labels_key: str | None = None,
        n_neighbors: int = 15,
        n_pcs: int = 50,
        n_lpe: int = 16,
        **kwargs,
    ) -> None:
        """Register counts, labels and the cell graph of an AnnData.

        The graph is built once and stored in the AnnData (so it is saved with it):
        log-normalised counts, PCA, a symmetric k-NN graph with Gaussian weights
        (pynndescent) in ``adata.obsp["scldiff_connectivities"]``, and the first ``n_lpe``
        non-trivial eigenvectors of its normalised Laplacian in
        ``adata.obsm["X_scldiff_lpe"]``. A graph already there with the same parameters is
        reused. Input is checked before anything is written; bad input raises
        :class:`ValueError` and leaves the AnnData unchanged.

        Parameters
        ----------
        adata
            AnnData with raw counts (cells x genes).
        layer
            Layer with the raw counts; ``None`` uses ``adata.X``.
        labels_key
            Column of ``adata.obs`` with the labels to condition on (e.g. cell types);
            ``None`` for an unconditional model.
        n_neighbors
            Neighbours per cell in the k-NN graph.
        n_pcs
            Principal components used to find neighbours.
        n_lpe
            Number of Laplacian positional encodings.
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields` (``source_registry``
            when a saved model is loaded).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
        check_graph_parameters(adata.n_obs, n_neighbors, n_pcs, n_lpe)
        check_labels(adata, labels_key)
        check_counts(adata, layer)
        _warn_backed_csc(adata, layer)
        _ensure_graph(adata, layer, n_neighbors, n_pcs, n_lpe)
        anndata_fields = [
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
            ObsmField(REGISTRY_KEYS.LPE_KEY, ADATA_KEYS.LPE),
            ObspField(REGISTRY_KEYS.GRAPH_KEY, ADATA_KEYS.GRAPH),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields,
                                       setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ----------------------------------------------------------------- properties
    @property
    def labels_key(self) -> str | None:
        """The ``adata.obs`` column the model is conditioned on (``None``: unconditional)."""
        return self.registry_["setup_args"].get("labels_key")

    @property
    def is_conditional(self) -> bool:
        return self.labels_key is not None

    @property
    def label_categories(self) -> list[str]:
        """The training labels, in the order of their codes."""
        state = self.registry_["field_registries"][REGISTRY_KEYS.LABELS_KEY]["state_registry"]
        return [str(c) for c in state["categorical_mapping"]]

    # -------------------------------------------------------------------- data
    def _collator(self, adata: AnnData | None = None) -> SubgraphCollator:
        adata = self.adata if adata is None else adata
        manager = self.get_anndata_manager(adata, required=True)
        counts = manager.get_from_registry(REGISTRY_KEYS.X_KEY)  # backed: read per minibatch
        labels = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LABELS_KEY)).ravel()
        lpe = np.asarray(manager.get_from_registry(REGISTRY_KEYS.LPE_KEY), dtype=np.float32)
        graph = manager.get_from_registry(REGISTRY_KEYS.GRAPH_KEY)
        sampler = SubgraphSampler(graph, n_hops=self.module.encoder.n_hops)
        return SubgraphCollator(counts, labels, lpe, sampler)

    def _split(self, train_size: float, validation_size: float | None, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
        n = self.adata.n_obs
        if not 0.0 < train_size <= 1.0:
            raise ValueError(f"train_size must lie in (0, 1], got {train_size}.")
        n_val = n - round(train_size * n) if validation_size is None else round(
            validation_size * n)
        n_train = round(train_size * n)
        if n_train < 1 or n_train + n_val > n:
            raise ValueError(f"train_size={train_size}, validation_size={validation_size} do "
                             f"not split {n} cells.")
        permutation = np.random.default_rng(seed).permutation(n)
        return np.sort(permutation[:n_train]), np.sort(permutation[n_train:n_train + n_val])

    @torch.inference_mode()
    def _posterior(self, collator: SubgraphCollator, indices: np.ndarray,
                   batch_size: int = 512, progress_bar: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means and log-variances of the given cells on the full graph.

        Each cell's expression is read and projected once, in a sequential pass over the
        rows (a backed matrix is read in order, block by block); the subgraph batches then
        gather the projections of their nodes instead of re-reading their expression.
        For a few cells (under 1/20 of all), each batch reads its subgraph's rows instead.
        """
        self.module.eval()
        device = self.device
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size * 20 < collator.labels.size:
            loader = SubgraphDataModule(collator, indices, [], batch_size)._loader(
                indices, shuffle=False)
            out = [self.module.inference(**self.module._get_inference_input(
                _to_device(batch, device)), use_mean=True)
                for batch in loader]
            return (torch.cat([o["qz_mean"].cpu() for o in out]),
                    torch.cat([o["qz_logvar"].cpu() for o in out]))
        projection, start = None, 0
        for block in collator.input_blocks():
            h = self.module.project_expression(
                torch.from_numpy(block.indptr.astype(np.int64)).to(device),
                torch.from_numpy(block.indices.astype(np.int64)).to(device),
                torch.from_numpy(block.data).to(device),
            ).cpu()
            if projection is None:  # (n_cells, n_hidden), filled block by block
                projection = h.new_empty((collator.labels.size, h.shape[1]))
            projection[start : start + h.shape[0]] = h
            start += h.shape[0]
        loader = SubgraphDataModule(collator, indices, [], batch_size).inference_loader()
        means, logvars = [], []
        for batch in track(loader, description="Encoding cells", disable=not progress_bar,
                           style="tqdm"):
            nodes = batch.pop(BATCH_KEYS.NODES)
            labels = batch.pop(BATCH_KEYS.LABELS)
            batch = _to_device(batch, device)
            out = self.module.inference_projected(projection[nodes].to(device),
                                                  n_seed=labels.shape[0],
                                                  labels=labels.to(device), **batch)
            means.append(out["qz_mean"].cpu())
            logvars.append(out["qz_logvar"].cpu())
        return torch.cat(means), torch.cat(logvars)

    # ------------------------------------------------------------------- training
    def _fit(self, plan, datamodule, max_epochs: int, accelerator, devices,
             trainer_kwargs: dict, stage: str, ckpt_path: str | None = None) -> None:
        # a copy: scvi-tools' runner appends to the model's history dict in place
        previous = dict(self.history_ or {})
        trainer_kwargs = dict(trainer_kwargs)
        if trainer_kwargs.get("enable_progress_bar", True) and trainer_kwargs.get(
                "simple_progress_bar", True):
            trainer_kwargs["simple_progress_bar"] = False
            trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []),
                                           StageProgressBar(stage)]
        if ckpt_path is not None:
            trainer_kwargs["ckpt_path"] = ckpt_path
        if any(isinstance(c, ModelCheckpoint) for c in trainer_kwargs.get("callbacks", [])):
            trainer_kwargs.setdefault("enable_checkpointing", True)  # scvi's default is off
        runner = LapDDPMTrainRunner(self, training_plan=plan, data_splitter=datamodule,
                                    max_epochs=max_epochs, accelerator=accelerator,
                                    devices=devices, **trainer_kwargs)
        try:
            with heap_kept():  # each step's tensors reuse the heap's pages
                runner()
        except BaseException:
            self.is_trained_ = False  # an unfinished run: generate() refuses until trained
            self.module.eval()
            raise
        if runner.trainer.is_global_zero:  # under DDP only rank 0's logger has a history
            self.history_ = _merge_history(previous,
                                           _safe_load_logger_history(runner.trainer))
        else:
            self.history_ = previous

    def _fit_library_size(self, indices: np.ndarray, collator: SubgraphCollator,
                          posterior: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> None:
        """Per-label distribution of the training cells' total counts: the quantile
        function of the log library size at ``_LIBRARY_QUANTILES`` evenly spaced
        probabilities, which generation draws from. The log-normal fit (mean and standard
        deviation of the log library size) that generation used before is kept beside it.
        Unless the library size is diffused, also the regression of the log library size on
        latents drawn from the cells' posteriors (``posterior``: means and log-variances of
        the cells ``indices``; encoded here when not given) that ``library_size="latent"``
        draws from."""
        if not self.module.diffuse_library:
            if posterior is None:
                posterior = self._posterior(collator, indices)
            n_latent = self.module.n_latent
            fit = LatentLibrary.fit(posterior[0][:, :n_latent],
                                    torch.from_numpy(collator.library[indices]),
                                    torch.from_numpy(collator.labels[indices]),
                                    len(self.label_categories),
                                    z_var=posterior[1][:, :n_latent].exp())
            self.library_latent_ = {name: getattr(fit, name).tolist()
                                    for name in _LATENT_LIBRARY_FIELDS}
        log_library = np.log(collator.library[indices].astype(np.float64))
        codes = collator.labels[indices]
        n_labels = len(self.label_categories)
        mean = np.full(n_labels, log_library.mean())
        std = np.full(n_labels, log_library.std(ddof=1) if log_library.size > 1 else 0.0)
        counts = np.bincount(codes, minlength=n_labels)
        probabilities = np.linspace(0.0, 1.0, _LIBRARY_QUANTILES)
        # a label without training cells draws from all of them
        quantiles = np.tile(np.quantile(log_library, probabilities), (n_labels, 1))
        for code in np.flatnonzero(counts):
            values = log_library[codes == code]
            quantiles[code] = np.quantile(values, probabilities)
            mean[code] = values.mean()
            if values.size > 1:
                std[code] = values.std(ddof=1)
        self.library_log_mean_ = mean.tolist()
        self.library_log_std_ = std.tolist()
        self.library_log_quantiles_ = quantiles.tolist()
        self.label_proportions_ = (counts / counts.sum()).tolist()

    def train(
        self,
        n_epochs_stage_a: int | None = None,
        n_epochs_stage_b: int | None = None,
        batch_size: int = 128,
        batch_size_stage_b: int = 256,
        train_size: float = 1.0,
        validation_size: float | None = None,
        lr: float = 1e-3,
        lr_stage_b: float = 1e-3,
        kl_weight: float = 1.0,
        n_epochs_kl_warmup: int | None = None,
        rec_weight: float = 1.0,
        perturbation: Literal["spectral", "random", "none"] = "spectral",
        epsilon: float = 0.05,
        power_iterations: int = 3,
        mask_fraction: float = 0.1,
        p_uncond: float = 0.1,
        ema_decay: float = 0.999,
        dispersion_lr_factor: float = 30.0,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        plan_kwargs: dict | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train in two stages: the graph VAE (A), then the latent diffusion (B).

        Stage A minibatches are subgraphs (seed cells and their graph neighbourhood), so a
        step costs O(batch_size * n_neighbors) whatever the number of cells. Stage B trains
        the ScoreNet on the frozen encoder's posterior. Losses of both stages are appended
        to :attr:`history` (``elbo_train``, ``reconstruction_loss_train``, ``kl_local_train``,
        ``perturbation_relative_change_train``, then ``diffusion_loss_train``).

        Parameters
        ----------
        n_epochs_stage_a
            Epochs of stage A; by default about 2,000 optimisation steps (at least one
            epoch). Against 1,000, that brought the generated cells of both benchmark
            datasets closer to held-out ones (conditional MMD, random-forest AUC; docs
            "Benchmarks") for about twice the stage's time, still a fraction of scVI's
            default training.
        n_epochs_stage_b
            Epochs of stage B; by default about 4,000 steps (at least one epoch).
        batch_size
            Seed cells per stage-A minibatch.
        batch_size_stage_b
            Cells per stage-B minibatch.
        train_size
            Fraction of cells used for training.
        validation_size
            Fraction used for validation (default: the rest).
        lr, lr_stage_b
            Learning rates of the two stages.
        kl_weight
            Weight of the KL term (after warm-up).
        n_epochs_kl_warmup
            Epochs of linear KL warm-up (default: a quarter of stage A).
        rec_weight
            Weight of the reconstruction term.
        perturbation
            Edge-weight adversary: ``"spectral"`` (paper 001), ``"random"`` or ``"none"``.
        epsilon
            Perturbation radius relative to the subgraph's weight norm.
        power_iterations
            Power-iteration steps for the principal eigenvector.
        mask_fraction
            Fraction of input gene counts masked for the encoder.
        p_uncond
            Probability of dropping a cell's label in stage B (classifier-free guidance).
        ema_decay
            Exponential moving average of the ScoreNet's weights (0 disables it).
        dispersion_lr_factor
            Learning rate of the decoder's gene dispersions relative to ``lr``. At the shared
            rate they barely leave their start (1) in the step budget and generated cells are
            too noisy: on PBMC3K the random-forest AUC of the posterior predictive falls from
            0.87 (factor 1) to 0.71 (10) and 0.66 (30) (``benchmarks/``).
        accelerator, devices
            Lightning accelerator and devices.
        plan_kwargs
            Extra keyword arguments of :class:`~scldiff.train.LapDDPMTrainingPlan`.
        **trainer_kwargs
            Passed to :class:`scvi.train.Trainer` (e.g. ``enable_progress_bar=False``,
            ``callbacks=[ModelCheckpoint(dirpath=..., save_last=True)]``), except
            ``ckpt_path``: a checkpoint written by such a callback during an earlier call
            with the same arguments; training resumes from it (in stage A or B, whichever
            it was written in) and ends as the uninterrupted run would have.

        Notes
        -----
        Reproducibility: a run draws one seed from torch's global generator (set by
        ``scvi.settings.seed``); the batch order of each epoch and every random draw of
        each step derive from it, so the same seed gives the same weights on CPU. On GPUs
        some kernels (scatter-adds of the graph convolution) are non-deterministic, so
        weights agree only to floating-point tolerance.

        A NaN or infinite loss or gradient stops training with
        :class:`~scldiff.train.NonFiniteLossError`, naming the stage and the loss term;
        the model keeps the weights of the last finite step.
        """
        if self.adata is None:
            raise ValueError("This model was loaded without an AnnData; pass adata to "
                             "LapDDPM.load(dir_path, adata) to train it.")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got "
                             f"{perturbation!r}.")
        if "max_epochs" in trainer_kwargs:
            raise ValueError("LapDDPM trains in two stages, each with its own number of "
                             "epochs: pass n_epochs_stage_a and n_epochs_stage_b instead of "
                             "max_epochs.")
        if perturbation != "none" and self.module.encoder.cheb_k == 1:
            raise ValueError(
                f"perturbation={perturbation!r} perturbs the graph's edge weights, but this "
                "model has cheb_k=1: its encoder sees each cell without its neighbours and "
                "uses no edge. Train it with perturbation='none', or build the model with "
                "cheb_k >= 2.")
        resume = trainer_kwargs.pop("ckpt_path", None)
        if resume is not None:
            meta, module_state = _read_checkpoint(resume)
            seed, resume_stage = meta["seed"], meta["stage"]
        else:  # one draw from the global generator (scvi.settings.seed) seeds the run
            seed, resume_stage = int(torch.randint(0, 2**31 - 1, ()).item()), None
        # the split derives from the run's seed, so a resumed run trains on the same cells
        train_idx, val_idx = self._split(train_size, validation_size, seed)
        n_a = (_epochs_for_steps(STAGE_A_STEPS, train_idx.size, batch_size)
               if n_epochs_stage_a is None else n_epochs_stage_a)
        n_b = (_epochs_for_steps(STAGE_B_STEPS, train_idx.size, batch_size_stage_b)
               if n_epochs_stage_b is None else n_epochs_stage_b)
        for name, value in (("n_epochs_stage_a", n_a), ("n_epochs_stage_b", n_b)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if n_a + n_b == 0:
            raise ValueError("Both stages have 0 epochs; nothing to train.")
        if len(val_idx):
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        plan_kwargs = dict(plan_kwargs or {})
        collator = self._collator()

        if resume_stage == "B":  # stage A had finished: its weights are in the checkpoint
            missing = set(self.module.state_dict()) - set(module_state)
            if missing:
                raise ValueError(f"The checkpoint {resume} does not fit this model (missing "
                                 f"{sorted(missing)[:5]}); resume with the same model.")
            self.module.load_state_dict(module_state)
            n_a = 0
        if n_a > 0:
            logger.info("Stage A: graph VAE, %d epochs.", n_a)
            plan_a = self._training_plan_cls(
                self.module, stage="A", lr=lr, kl_weight=kl_weight,
                n_epochs_kl_warmup=max(n_a // 4, 1) if n_epochs_kl_warmup is None
                else n_epochs_kl_warmup,
                rec_weight=rec_weight, perturbation=perturbation, epsilon=epsilon,
                power_iterations=power_iterations, mask_fraction=mask_fraction,
                **{"dispersion_lr_factor": dispersion_lr_factor, "seed": seed, **plan_kwargs},
            )
            data_a = SubgraphDataModule(collator, train_idx, val_idx, batch_size, seed=seed)
            self._fit(plan_a, data_a, n_a, accelerator, devices, trainer_kwargs,
                      STAGE_NAMES["A"], resume if resume_stage == "A" else None)

        posterior = None  # posterior of the training cells, once encoded
        if n_b > 0:
            logger.info("Stage B: latent diffusion, %d epochs.", n_b)
            library = torch.from_numpy(collator.library.astype(np.float32))
            bar = bool(trainer_kwargs.get("enable_progress_bar", True))
            qz_mean, qz_logvar = self.module.diffusion_inputs(
                *self._posterior(collator, train_idx, progress_bar=bar), library[train_idx])
            self.module.set_latent_statistics(qz_mean, qz_logvar)
            posterior = (qz_mean, qz_logvar)
            labels = torch.from_numpy(collator.labels)
            val = None
            if len(val_idx):
                val = (*self.module.diffusion_inputs(
                    *self._posterior(collator, val_idx, progress_bar=bar), library[val_idx]),
                    labels[val_idx])
            data_b = LatentDataModule((qz_mean, qz_logvar, labels[train_idx]), val,
                                      batch_size_stage_b, seed=seed)
            plan_b = self._training_plan_cls(
                self.module, stage="B", lr=lr_stage_b, p_uncond=p_uncond if
                self.is_conditional else 0.0, ema_decay=ema_decay,
                **{"seed": seed, **plan_kwargs},
            )
            self._fit(plan_b, data_b, n_b, accelerator, devices, trainer_kwargs,
                      STAGE_NAMES["B"], resume if resume_stage == "B" else None)

        self._fit_library_size(train_idx, collator, posterior)
        self.train_indices_, self.validation_indices_ = train_idx, val_idx
        self.test_indices_ = np.zeros(0, dtype=np.int64)
        self.is_trained_ = True
        self.module.eval()

    # ------------------------------------------------------------------ inference
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
            Show a progress bar (about a minute for 1M cells on 2 CPU cores).

        Returns
        -------
        ``(n_cells, n_latent)`` array.
        """
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        mean, _ = self._posterior(self._collator(adata), indices, batch_size, progress_bar)
        return mean.numpy()

    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: np.ndarray | None = None,
        batch_size: int = 512,
        seed: int | None = None,
        progress_bar: bool = False,
    ) -> AnnData:
        r"""Counts drawn from each cell's posterior predictive: the stage-A model's
        reconstruction, with no diffusion.

        For every cell, a latent :math:`z \sim q(z \mid x)` (encoded on the full cell
        graph) is decoded with the cell's own library size (its total count) and counts are
        drawn from the likelihood. Comparing these cells with :meth:`generate`'s tells the
        count model's share of a gap to real data from the latent diffusion's: the diffusion
        cannot do better than the posterior it was trained on (``benchmarks/prior_gap.py``).

        Parameters
        ----------
        adata
            AnnData set up like the training data (default: the model's).
        indices
            Cells to draw, in this order; repeat an index for several draws of a cell
            (default: all cells once).
        batch_size
            Seed cells per encoding batch.
        seed
            Seed of the latent and count draws.
        progress_bar
            Show a progress bar while encoding.

        Returns
        -------
        AnnData like :meth:`generate`'s: integer counts in ``X`` (CSR) and
        ``layers["counts"]``, the training ``var_names``, the cells' own labels and
        ``obs["synthetic"] = True``; ``obs["source_cell"]`` names the cell each row was
        drawn from.
        """
        self._check_if_trained(warn=True)
        adata = self._validate_anndata(adata)
        indices = np.arange(adata.n_obs) if indices is None else np.asarray(indices)
        if indices.ndim != 1 or (indices.size and (
                not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0
                or indices.max() >= adata.n_obs)):
            raise ValueError(f"indices must be integer positions of cells in [0, "
                             f"{adata.n_obs}), got {indices!r}.")
        collator = self._collator(adata)
        unique, inverse = np.unique(indices, return_inverse=True)
        mean, logvar = self._posterior(collator, unique, batch_size, progress_bar)
        rng = np.random.default_rng(seed)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        mean, logvar = mean[inverse], logvar[inverse]
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
        library = torch.from_numpy(collator.library[indices].astype(np.float32))
        self.module.eval()
        codes = torch.from_numpy(collator.labels[indices]).to(self.device)
        # X and the counts layer, sharing no memory (see generate)
        x, counts = self.module._stack(self.module._decode_blocks(
            z.to(self.device), library.to(self.device), rng, labels=codes), copies=2)
        obs = pd.DataFrame(index=pd.Index([f"posterior-{i}" for i in range(indices.size)]))
        if self.is_conditional:
            obs[self.labels_key] = pd.Categorical.from_codes(
                collator.labels[indices], categories=self.label_categories)
        obs["synthetic"] = True
        obs["source_cell"] = np.asarray(adata.obs_names[indices], dtype=str)
        var = pd.DataFrame(index=pd.Index(np.asarray(self.get_var_names(), dtype=str)))
        return AnnData(X=x, obs=obs, var=var, layers={"counts": counts},
                       uns={"scldiff": {"model": "LapDDPM", "scldiff_version": __version__,
                                        "seed": "" if seed is None else str(seed),
                                        "draw": "posterior predictive",
                                        "likelihood": self.module.likelihood}})

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
        r"""Generate cells: guided latent diffusion, decoder, library size, count sampling.

        Parameters
        ----------
        labels
            A mapping ``{label: count}``, or a sequence with one label per cell. ``None``
            gives ``n_samples`` cells in the training label proportions.
        n_samples
            Number of cells when ``labels`` is ``None`` (default: as many as trained on).
        guidance_scale
            Classifier-free guidance :math:`w` in :math:`\epsilon_u + w(\epsilon_c -
            \epsilon_u)`: 0 draws the latents without the labels (a decoder that reads
            the labels, ``decoder_labels``, still decodes them with each cell's label), 1
            samples the conditional model, larger values sharpen the labels. The default
            1.5 was chosen by measurement (``benchmarks/sampler_steps.py``, 3 splits x 3
            draws, docs "Benchmarks"): with the velocity-predicting ScoreNet, scales 1.5 and
            2 give the same conditional MMD on PBMC3K (0.613 and 0.611) and 1.5 a lower one
            on Zheng 2017 (0.164 against 0.166), with a lower random-forest AUC there
            (0.594 against 0.605); scale 1 is farther from held-out cells on both. (With
            the noise-predicting ScoreNet, 2 had been chosen.) Ignored by unconditional
            models.
        sampler
            ``"ode"`` (probability-flow ODE, DPM-Solver++(2M)), ``"ddim"`` or ``"sde"``
            (reverse SDE, Euler–Maruyama).
        n_steps
            Sampler steps (default 10 for ``"ode"``, 200 for ``"ddim"``, 500 for ``"sde"``).
        batch_size
            Cells generated at a time. Default: 4096 on a CPU; on a GPU as many as keep
            the dense ``(cells, genes)`` arrays of a batch within about an eighth of the
            device's memory (multiples of 1024, at most 65,536), so that a GPU draws
            10,000 PBMC3K cells in one batch. Recorded in ``uns["scldiff"]["batch_size"]``.
        seed
            Seed of the random numbers; the same seed and ``batch_size`` give the same
            counts, also after save and load, on the same kind of device. On a GPU the
            counts are drawn there, from a torch generator, so they differ from a CPU's
            for the same seed (with the same distribution).
        progress_bar
            Show a progress bar.
        library_size
            How the cells' library sizes are drawn: ``"latent"`` (given each cell's latent)
            or ``"label"`` (from the label's training cells, independently of the latent);
            see :class:`LapDDPM`'s argument of that name. ``None``: the model's. Not for a
            model that diffuses the library size with the latent.
        guidance_interval
            ``(t_low, t_high)`` with :math:`0 \le t_{low} \le t_{high} \le 1`: apply the
            guidance only at diffusion times in that interval (:math:`t = 1` is pure noise,
            :math:`t \approx 0` the data) and sample the conditional model (scale 1)
            elsewhere, which also skips the unconditional network evaluation there
            (Kynkäänniemi et al., 2024). ``None``: guide at every step. Recorded in
            ``uns["scldiff"]["guidance_interval"]``.
        precision
            ``"float32"``, or ``"bfloat16"``: the networks' matrix products in bf16, as
            under ``torch.autocast(device, dtype=torch.bfloat16)`` (see Notes). Recorded in
            ``uns["scldiff"]["precision"]``, which also records a caller's autocast.

        Returns
        -------
        AnnData with integer counts in ``X`` (CSR) and ``layers["counts"]``, the training
        ``var_names``, ``obs[labels_key]`` (categorical, training categories),
        ``obs["synthetic"] = True`` and provenance in ``uns["scldiff"]``.

        Notes
        -----
        With ``precision="bfloat16"``, or called under ``torch.autocast(device,
        dtype=torch.bfloat16)``, the networks' matrix products run in bf16 (their outputs
        move by about 0.3-0.4%); the ODE's state, the softmax and the count draws stay in
        float32/float64. Faster only where the hardware computes bf16 natively (on a CPU
        without bf16 instructions it is several times slower); on the benchmark splits the
        scores stayed within the spread between draws (docs "Scaling", "Mixed precision").
        """
        self._check_if_trained(warn=False)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}.")
        if isinstance(guidance_scale, bool) or not isinstance(
                guidance_scale, (int, float, np.integer, np.floating)) \
                or not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got "
                             f"{guidance_scale!r}.")
        for name, value in (("n_steps", n_steps), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(precision, str) or precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got "
                             f"{precision!r}.")
        library_size = self._generation_library_size(library_size)
        if labels is None and n_samples is None:
            n_samples = len(self.train_indices_)
        categories = self.label_categories
        codes = resolve_generation_labels(labels, n_samples, categories,
                                          np.asarray(self.label_proportions_),
                                          self.is_conditional)
        scale = float(guidance_scale) if self.is_conditional else 1.0
        interval = check_guidance_interval(guidance_interval)
        steps = n_steps or DEFAULT_STEPS[sampler]

        seed_sequence = np.random.SeedSequence(seed)
        torch_seed, numpy_seed = seed_sequence.spawn(2)
        device = self.device
        if batch_size is None:
            batch_size = default_generation_batch(device, self.module.decoder.scale.out_features)
        generator = torch.Generator(device=device)
        generator.manual_seed(int(torch_seed.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        rng = np.random.default_rng(numpy_seed)
        if self.module.diffuse_library:
            library = None
        elif library_size == "latent":
            library = self._latent_library().to(device)
        elif self.library_log_quantiles_ is not None:
            library = np.exp(_sample_quantiles(np.asarray(self.library_log_quantiles_), codes,
                                               rng)).astype(np.float32)
        else:  # a model saved before the library quantiles were kept
            log_mean = np.asarray(self.library_log_mean_)[codes]
            log_std = np.asarray(self.library_log_std_)[codes]
            library = np.exp(rng.normal(log_mean, log_std)).astype(np.float32)

        self.module.eval()
        # bf16 asked for, or the caller's autocast on this device (recorded either way)
        autocast = contextlib.nullcontext() if precision == "float32" else \
            torch.autocast(device.type, dtype=_PRECISIONS[precision])
        blocks = []
        with autocast, heap_kept():
            computed_in = autocast_dtype(device.type)
            for start in track(range(0, codes.size, batch_size),
                               description="Generating cells", disable=not progress_bar,
                               style="tqdm"):
                stop = min(start + batch_size, codes.size)
                # row blocks of all batches, stacked once below: every full-size copy of
                # the counts costs fresh memory pages
                blocks += self.module._sample_blocks(
                    torch.from_numpy(codes[start:stop]),
                    library if library is None or isinstance(library, LatentLibrary)
                    else torch.from_numpy(library[start:stop]),
                    rng, guidance_scale=scale, sampler=sampler, n_steps=steps,
                    generator=generator, guidance_interval=interval,
                )
        # X and the counts layer, which must not share memory (in-place normalisation of X
        # would change the counts), each written once from the blocks
        x, counts = self.module._stack(blocks, copies=2)

        obs = pd.DataFrame(index=pd.Index([f"synthetic-{i}" for i in range(codes.size)]))
        if self.is_conditional:
            obs[self.labels_key] = pd.Categorical.from_codes(codes, categories=categories)
        obs["synthetic"] = True
        var = pd.DataFrame(index=pd.Index(np.asarray(self.get_var_names(), dtype=str)))
        provenance = {
            "model": "LapDDPM",
            "scldiff_version": __version__,
            "scvi_tools_version": self.registry_.get("scvi_version", ""),
            "torch_version": str(torch.__version__),
            "seed": "" if seed is None else str(seed),
            "seed_entropy": str(seed_sequence.entropy),
            "sampler": sampler,
            "n_steps": int(steps),
            "batch_size": int(batch_size),
            "guidance_scale": scale,
            "guidance_interval": list(interval or (0.0, 1.0)),
            # the networks' matrix products: float32, or autocast's dtype
            "precision": "float32" if computed_in is None else str(computed_in).split(".")[-1],
            "likelihood": self.module.likelihood,
            "labels_key": self.labels_key or "",
            "library_size": ("diffused jointly with the latent" if self.module.diffuse_library
                             else "regressed on the latent (per-label linear fit of the "
                             "training cells' log library sizes, empirical residuals)"
                             if library_size == "latent"
                             else "per-label quantiles of the training cells"
                             if self.library_log_quantiles_ is not None
                             else "per-label log-normal fit of the training cells"),
        }
        synth = AnnData(X=x, obs=obs, var=var, layers={"counts": counts},
                        uns={"scldiff": provenance})
        return synth

    def _latent_library(self) -> LatentLibrary:
        """The fitted regression of the library size on the latent (``library_latent_``)."""
        return LatentLibrary(*(torch.tensor(self.library_latent_[name], dtype=torch.float32)
                               for name in _LATENT_LIBRARY_FIELDS))

    def _generation_library_size(self, library_size: str | None) -> str:
        """The library-size mode ``generate`` uses: ``library_size``, checked, or the
        model's."""
        if self.module.diffuse_library:
            if library_size not in (None, "diffusion"):
                raise ValueError(f"library_size={library_size!r}: this model diffuses the "
                                 "library size with the latent (library_size='diffusion'); "
                                 "leave library_size unset.")
            return "diffusion"
        if library_size is None:
            library_size = self.library_size
        if library_size not in ("latent", "label"):
            raise ValueError(f"library_size must be 'latent' or 'label' for this model, got "
                             f"{library_size!r}.")
        if library_size == "latent" and self.library_latent_ is None:
            raise ValueError("library_size='latent' needs the regression of the library "
                             "size on the latent, which this model lacks (it was trained "
                             "before scldiff fitted one): generate with "
                             "library_size='label', or train the model again.")
        return library_size

    # ------------------------------------------------------------------ save / load
    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model (and optionally its AnnData) without pickle.

        Writes ``model.safetensors`` (weights) and ``model.json`` (everything else), plus
        ``adata.h5ad`` with ``save_anndata=True``, atomically: the files are written to a
        staging directory that is then renamed into place (or, over an existing model,
        exchanged with it in one step), so an interrupted save leaves the old model or the
        new one, never a mixture.

        Parameters
        ----------
        dir_path
            Directory to create.
        prefix
            Not supported (kept for scvi-tools signature compatibility); must be ``None``.
        overwrite
            Replace an existing directory.
        save_anndata
            Also write the AnnData (with its cell graph).
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.
        """
        if prefix is not None:
            raise ValueError("prefix is not supported by LapDDPM.save; use dir_path.")
        attributes = {
            "model_name": type(self).__name__,
            "scldiff_version": __version__,
            "init_params_": self.init_params_,
            "registry_": self.registry_,
            "var_names": np.asarray(self.get_var_names(), dtype=str),
        }
        for name in _SAVED_ATTRIBUTES:
            attributes[name] = getattr(self, name, None)
        write_adata = None
        if save_anndata:
            if self.adata is None:
                raise ValueError("save_anndata=True but the model has no AnnData.")
            write_adata = lambda path: self.adata.write_h5ad(path, **anndata_write_kwargs)
        write_model_dir(dir_path, self.module.state_dict(), attributes, write_adata, overwrite)

    @classmethod
    def load(
        cls,
        dir_path: str,
        adata: AnnData | None | Literal[False] = None,
        accelerator: str = "auto",
        device: int | str = "auto",
    ) -> LapDDPM:
        """Load a model saved by :meth:`save`; never executes code from the files.

        Parameters
        ----------
        dir_path
            The model directory.
        adata
            AnnData with the training genes; ``None`` loads ``adata.h5ad`` from the
            directory when present (else the model has no data: it can still generate),
            ``False`` never loads data.
        accelerator, device
            Where to put the model.
        """
        from scvi.model._utils import parse_device_args

        dir_path = resolve_model_dir(dir_path)
        state_dict, attributes = read_model_dir(dir_path)
        for key in ("model_name", "init_params_", "registry_", "var_names"):
            if key not in attributes:
                raise ModelFileError(f"{dir_path}/model.json lacks {key!r}.")
        if attributes["model_name"] != cls.__name__:
            raise ModelFileError(f"{dir_path} holds a {attributes['model_name']!r} model, not "
                                 f"{cls.__name__}.")
        registry = attributes["registry_"]
        init_params = attributes["init_params_"]
        if not isinstance(registry, dict) or "setup_args" not in registry or not isinstance(
                init_params, dict) or not isinstance(init_params.get("non_kwargs"), dict):
            raise ModelFileError(f"{dir_path}/model.json has a malformed registry or init "
                                 "parameters.")
        var_names = np.asarray(attributes["var_names"], dtype=str)

        if adata is None:
            path = os.path.join(dir_path, ADATA_FILE)
            if os.path.exists(path):
                import anndata

                adata = anndata.read_h5ad(path)
        if adata is False:
            adata = None
        if adata is not None:
            given = np.asarray(adata.var_names, dtype=str)
            if not np.array_equal(given, var_names):
                missing = [g for g in var_names if g not in set(given)]
                extra = [g for g in given if g not in set(var_names)]
                raise ValueError(
                    "The AnnData's genes differ from the model's: "
                    f"{len(missing)} missing (e.g. {missing[:5]}), {len(extra)} extra "
                    f"(e.g. {extra[:5]})"
                    + ("" if missing or extra else ", same genes in another order")
                    + ". Subset and order them as in training: adata[:, model_var_names]."
                )
            cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
        non_kwargs = dict(init_params["non_kwargs"])
        # models saved before the decoder could read labels were trained without them
        non_kwargs.setdefault("decoder_labels", False)
        # ... and before the library size could follow the latent, with the label's
        non_kwargs.setdefault("library_size", "label")
        # ... and before the ScoreNet could predict the velocity, with the noise
        non_kwargs.setdefault("prediction", "epsilon")
        try:
            model = cls(adata, registry=registry if adata is None else None, **non_kwargs)
        except TypeError as err:
            raise ModelFileError(f"{dir_path}/model.json has unexpected init parameters: "
                                 f"{err}") from err
        try:
            model.module.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise ModelFileError(
                f"The weights in {dir_path} do not fit the model its model.json describes "
                f"(missing, unexpected or mis-shaped tensors): {err}"
            ) from err
        for name in _SAVED_ATTRIBUTES:
            if name in attributes:
                setattr(model, name, attributes[name])
        quantiles = model.library_log_quantiles_
        if quantiles is not None:
            try:
                values = np.asarray(quantiles, dtype=np.float64)
            except (TypeError, ValueError):
                values = np.empty(0)
            n_labels = len(model.label_categories)
            if (values.ndim != 2 or values.shape[0] != n_labels or values.shape[1] < 2
                    or not np.isfinite(values).all() or (np.diff(values, axis=1) < 0).any()):
                raise ModelFileError(
                    f"{dir_path}: library_log_quantiles_ in its model.json is not a table of "
                    f"non-decreasing finite numbers with one row per label ({n_labels}); the "
                    "file is damaged. Save the model again from the trained one.")
        _check_latent_library(model.library_latent_, model.module.n_latent,
                              len(model.label_categories), dir_path)
        _, _, torch_device = parse_device_args(accelerator=accelerator, devices=device,
                                               return_device="torch",
                                               validate_single_device=True)
        model.to_device(torch_device)
        model.module.eval()
        return model

    def __repr__(self) -> str:
        trained = "trained" if self.is_trained_ else "untrained"
        return f"{self._model_summary_string} ({trained})"

