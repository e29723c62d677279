"""LapDDPM: the scvi-tools model class, the only layer that touches AnnData."""

from __future__ import annotations

import math
import os
from typing import Literal

import numpy as np
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalJointObsField, CategoricalObsField, LayerField
from scvi.model.base import BaseModelClass

from .._version import __version__
from ..distributions import LIKELIHOODS, Likelihood
from ..module import PREDICTIONS, LapDDPMModule
from ._attributes import Attribute, label_column, registered_attributes
from ._constants import ADATA_KEYS, REGISTRY_KEYS
from ._expression import ExpressionMixin
from ._fields import (
    ChromatinField,
    ContinuousCovariatesField,
    ModalityField,
    ObspField,
    PositionalEncodingField,
)
from ._generation import GenerationMixin
from ._library import LIBRARY_SIZES, LibrarySizeModel
from ._multiome import MultiomeMixin, lsi_state
from ._perturbation import PerturbationMixin
from ._serialization import (
    ADATA_FILE,
    ModelFileError,
    read_model_dir,
    resolve_model_dir,
    restore_attributes,
    write_model_dir,
)
from ._setup import (
    ensure_clusters,
    ensure_graph,
    ensure_lsi,
    multiome_settings,
    spatial_settings,
    warn_backed_csc,
)
from ._spatial import SpatialMixin
from ._training import TrainingMixin
from ._validation import (
    check_attributes,
    check_clustering,
    check_counts,
    check_genes,
    check_graph_parameters,
    check_modality,
    check_spatial,
    modality_split,
)

# attributes saved with the model besides its init parameters and registry (JSON)
_SAVED_ATTRIBUTES = ("is_trained_", "history_", "train_indices_", "validation_indices_",
                     "test_indices_", "combinations_", "lsi_")


class LapDDPM(TrainingMixin, GenerationMixin, SpatialMixin, MultiomeMixin, PerturbationMixin,
              ExpressionMixin, BaseModelClass):
    r"""Conditional graph latent diffusion model for scRNA-seq counts (LapDDPM, Bini &
    Marchand-Maillet, 2025).

    A Chebyshev GNN encodes each cell from its expression and Laplacian positional
    encodings on a k-NN cell graph; a count decoder with an explicit library size
    reconstructs it; a conditional diffusion model with classifier-free guidance learns the
    distribution of the latents. Training perturbs the graph's edge weights adversarially
    along its principal spectral mode. Each option's reason and measurements: docs "The
    model" and "Benchmarks".

    The diffusion is conditioned on every attribute registered by :meth:`setup_anndata`
    (labels, categorical and continuous covariates; a spot's position in its tissue; a
    cell's chromatin in paired RNA + ATAC data), each with its own null token, so that
    :meth:`generate` takes any subset of them and composes their guidance.

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
        with ``plan_kwargs={"perturbation": "none"}``.
    n_cheb_layers
        Number of graph layers.
    likelihood
        ``"zinb"`` (zero-inflated negative binomial, default), ``"nb"`` or ``"poisson"``.
    dropout_rate
        Encoder dropout.
    score_hidden, score_blocks
        Width and depth of the ScoreNet.
    beta_min, beta_max, t_min
        VP-SDE schedule, see :class:`scldiff.diffusion.VPSchedule`.
    library_size
        How generated cells get their library sizes (:class:`LibrarySizeModel`):
        ``"latent"`` (default), given the generated latent, so that the depth follows the
        cell state within a group as in real cells, or ``"label"``, from the group's
        training cells alone; a group is a combination of categorical attributes.
    decoder_covariates
        Give the decoder each cell's categorical attributes (labels and categorical
        covariates, one-hot) beside its latent, as scVI's decoder takes its covariates, so
        that batch-like effects live in the decoder and the latent carries biology;
        generated cells are decoded with the attributes they are drawn for. ``None``
        (default): whenever the model has categorical attributes.
    prediction
        What the ScoreNet learns to predict: ``"v"`` (default), the velocity
        :math:`\alpha_t\epsilon - \sigma_t z_0`, or ``"epsilon"``, the noise, as in the
        LapDDPM paper (:class:`~scldiff.module.LapDDPMModule`).
    accessibility_decoder
        Paired RNA + ATAC: also decode peaks from the latent (a Bernoulli per peak,
        :class:`~scldiff.module.AccessibilityDecoder`, fitted after the graph VAE), so that
        :meth:`generate` returns paired cells in the training layout.

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
        library_size: Literal["latent", "label"] = "latent",
        decoder_covariates: bool | None = None,
        prediction: Literal["v", "epsilon"] = "v",
        accessibility_decoder: bool = False,
    ):
        for name, value, allowed in (("likelihood", likelihood, LIKELIHOODS),
                                     ("library_size", library_size, LIBRARY_SIZES),
                                     ("prediction", prediction, PREDICTIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        super().__init__(adata, registry)
        n_categories = [len(a.categories) for a in self.attributes if a.kind == "categorical"]
        n_continuous = len(self.attributes) - len(n_categories)
        if decoder_covariates and not n_categories:
            raise ValueError("decoder_covariates=True needs categorical attributes: set up "
                             "the AnnData with labels_key or categorical_covariate_keys, or "
                             "leave it unset.")
        if decoder_covariates is None:
            decoder_covariates = bool(n_categories)
        if accessibility_decoder and not self.modality_key:
            raise ValueError("accessibility_decoder=True generates peaks: set up paired RNA + "
                             "ATAC data with modality_key.")
        stats = self.summary_stats
        self.module = self._module_cls(
            n_input=stats.get("n_genes", stats["n_vars"]), n_categories=n_categories,
            n_continuous=n_continuous,
            n_lpe=stats.get("n_lpe", 0),
            lpe_scale=math.sqrt(stats["n_cells"]), n_latent=n_latent, n_hidden=n_hidden,
            cheb_k=cheb_k, n_cheb_layers=n_cheb_layers, likelihood=likelihood,
            dropout_rate=dropout_rate, score_hidden=score_hidden, score_blocks=score_blocks,
            beta_min=beta_min, beta_max=beta_max, t_min=t_min,
            decoder_covariates=decoder_covariates, prediction=prediction,
            n_position=stats.get("n_lpe", 0) if self.spatial_key else 0,
            n_chromatin=stats.get("n_lsi", 0),
            n_peaks=stats.get("n_peaks", 0) if accessibility_decoder else 0,
        )
        # the fitted LSI of paired data's peaks (plain numbers, saved in model.json)
        self.lsi_ = lsi_state(adata) if adata is not None and self.modality_key else None
        self.library_size = library_size
        self.library_model_: LibrarySizeModel | None = None
        self.combinations_: dict | None = None
        self._model_summary_string = (
            f"LapDDPM with n_latent={n_latent}, likelihood={likelihood!r}, "
            f"{len(self.attributes)} attribute(s) {[a.key for a in self.attributes]}, "
            f"Chebyshev K={cheb_k} x {n_cheb_layers} layer(s), {stats.get('n_lpe', 0)} LPE."
        )
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        cluster_labels: bool = False,
        cluster_resolution: float = 1.0,
        n_neighbors: int = 15,
        n_pcs: int = 50,
        n_lpe: int = 16,
        spatial_key: str | None = None,
        spatial_graph: Literal["grid", "knn", "delaunay"] = "grid",
        spatial_neighbors: int = 6,
        expression_edges: bool = False,
        modality_key: str | None = None,
        graph_modality: Literal["rna", "atac", "both"] = "rna",
        lsi_components: int = 20,
        **kwargs,
    ) -> None:
        """Register counts, the cells' attributes and the cell graph of an AnnData.

        The graph is built once and stored in the AnnData (so it is saved with it):
        log-normalised counts, PCA, a symmetric k-NN graph with Gaussian weights in
        ``adata.obsp["scldiff_connectivities"]``, and the first ``n_lpe`` non-trivial
        eigenvectors of its normalised Laplacian in ``adata.obsm["X_scldiff_lpe"]``. A
        graph already there with the same parameters is reused. Input is checked before
        anything is written; bad input raises :class:`ValueError` and leaves the AnnData
        unchanged.

        Every attribute (labels, categorical and continuous covariates) is registered with
        its categories or its training mean, spread and range (docs "The model").

        Parameters
        ----------
        adata
            AnnData with raw counts (cells x genes), in memory or backed.
        layer
            Layer with the raw counts; ``None`` uses ``adata.X``.
        labels_key
            Column of ``adata.obs`` with the labels to condition on (e.g. cell types).
        categorical_covariate_keys
            Further categorical ``adata.obs`` columns to condition on (condition, donor,
            batch, ...).
        continuous_covariate_keys
            Numeric ``adata.obs`` columns to condition on (dose, time, ...).
        cluster_labels
            Without labels: Leiden clusters of the cell graph (:func:`scanpy.tl.leiden`) in
            ``adata.obs["scldiff_cluster"]`` are the labels (SCLD, Wang et al., 2023), so
            that unlabelled data get guidance too.
        cluster_resolution
            Leiden resolution of ``cluster_labels`` (higher: more clusters).
        n_neighbors
            Neighbours per cell in the k-NN graph.
        n_pcs
            Principal components used to find neighbours.
        n_lpe
            Number of Laplacian positional encodings.
        spatial_key
            ``adata.obsm`` key of the spots' (or cells') coordinates in a tissue: the graph is
            then the tissue's neighbourhood graph (:func:`~scldiff.graph.spatial_graph`,
            also written as ``obsp["spatial_connectivities"]`` and
            ``obsp["spatial_distances"]`` for squidpy and scanpy), its LPE are the tissue's
            smooth coordinates, and the diffusion is conditioned on each spot's LPE, so that
            :meth:`generate` ``(spots=...)`` draws sections with the tissue's spatial
            structure. A spot without a neighbour is joined to its nearest spot (warned).
        spatial_graph
            ``"grid"`` (Visium's hexagonal array, or any regular lattice), ``"knn"`` or
            ``"delaunay"`` (irregular positions, e.g. cell-resolved data).
        spatial_neighbors
            Neighbours per spot of ``spatial_graph="knn"``.
        expression_edges
            With ``spatial_key``: add the expression k-NN graph's edges to the encoder's
            graph (the LPE stay the tissue's).
        modality_key
            Paired RNA + ATAC (10x Multiome, SNARE-seq, SHARE-seq): the ``adata.var``
            column marking each feature ``"rna"`` or ``"atac"``, genes first, then peaks
            (MultiVI's layout; :func:`~scldiff.model.paired_anndata` builds it from a
            MuData). The model generates the genes; the binarised peaks are embedded by LSI
            (:class:`~scldiff.graph.LSI`, in ``obsm["X_scldiff_lsi"]``, the fit in
            ``uns["scldiff_lsi"]`` and the saved model), the diffusion's condition, so that
            :meth:`generate` ``(conditions=atac)`` gives RNA for chromatin states.
        graph_modality
            With ``modality_key``: the cell graph from the genes (``"rna"``), the peaks'
            LSI (``"atac"``) or the union of both graphs (``"both"``).
        lsi_components
            With ``modality_key``: dimensions of the LSI embedding (after its first
            component, which follows sequencing depth, is dropped).
        **kwargs
            Passed to :meth:`scvi.data.AnnDataManager.register_fields` (``source_registry``
            when a saved model is loaded).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not isinstance(adata, AnnData):
            raise TypeError(f"adata must be an AnnData, got {type(adata).__name__}.")
        check_graph_parameters(adata.n_obs, n_neighbors, n_pcs, n_lpe)
        check_spatial(adata, spatial_key, spatial_graph, spatial_neighbors, expression_edges)
        check_modality(adata, layer, modality_key, graph_modality, lsi_components, spatial_key)
        n_genes = modality_split(adata, modality_key) if modality_key else adata.n_vars
        check_clustering(labels_key, cluster_labels, cluster_resolution)
        check_attributes(adata, labels_key, categorical_covariate_keys,
                         continuous_covariate_keys)
        check_counts(adata, layer, n_genes if modality_key else None)
        warn_backed_csc(adata, layer)
        multiome = multiome_settings(modality_key, n_genes, graph_modality, lsi_components)
        if multiome:
            ensure_lsi(adata, layer, multiome)
        ensure_graph(adata, layer, n_neighbors, n_pcs, n_lpe, spatial_settings(
            spatial_key, spatial_graph, spatial_neighbors, expression_edges), multiome)
        if cluster_labels:
            ensure_clusters(adata, cluster_resolution)
        labels = label_column({"labels_key": labels_key, "cluster_labels": cluster_labels})
        adata_manager = AnnDataManager(fields=[
            LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels),
            CategoricalJointObsField(REGISTRY_KEYS.CAT_COVS_KEY, categorical_covariate_keys),
            ContinuousCovariatesField(REGISTRY_KEYS.CONT_COVS_KEY, continuous_covariate_keys),
            PositionalEncodingField(REGISTRY_KEYS.LPE_KEY, ADATA_KEYS.LPE),
            ObspField(REGISTRY_KEYS.GRAPH_KEY, ADATA_KEYS.GRAPH),
            ModalityField(REGISTRY_KEYS.MODALITY_KEY, modality_key),
            ChromatinField(REGISTRY_KEYS.LSI_KEY, ADATA_KEYS.LSI if modality_key else None),
        ], setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @property
    def attributes(self) -> list[Attribute]:
        """The cells' attributes the model is conditioned on, in the networks' order: the
        labels, the categorical covariates, the continuous covariates."""
        return registered_attributes(self.registry_)

    @property
    def attribute_keys(self) -> list[str]:
        """The ``adata.obs`` columns of :attr:`attributes`: the order of the values in the
        tuple keys of ``generate(conditions={...})``."""
        return [a.key for a in self.attributes]

    @property
    def labels_key(self) -> str | None:
        """The ``adata.obs`` column of the labels (``"scldiff_cluster"`` with
        ``cluster_labels=True``; ``None``: no labels)."""
        return label_column(self.registry_["setup_args"])

    @property
    def spatial_key(self) -> str | None:
        """The ``adata.obsm`` key of the spots' coordinates (``None``: not spatial)."""
        return self.registry_["setup_args"].get("spatial_key")

    @property
    def is_conditional(self) -> bool:
        """Whether the model has any attribute to condition on."""
        return bool(self.attributes)

    @property
    def label_categories(self) -> list[str]:
        """The training labels, in the order of their codes (empty without labels)."""
        if self.labels_key is None:
            return []
        return list(self.attributes[0].categories)

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
            Not supported (kept for scvi-tools' signature); must be ``None``.
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
            "library_model_": None if self.library_model_ is None
            else self.library_model_.to_dict(),
            **{name: getattr(self, name, None) for name in _SAVED_ATTRIBUTES},
        }
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
        for key in ("model_name", "init_params_", "registry_", "var_names", "library_model_"):
            if key not in attributes:
                raise ModelFileError(f"{dir_path}/model.json lacks {key!r}.")
        if attributes["model_name"] != cls.__name__:
            raise ModelFileError(f"{dir_path} holds a {attributes['model_name']!r} model, not "
                                 f"{cls.__name__}.")
        registry, init_params = attributes["registry_"], attributes["init_params_"]
        if not isinstance(registry, dict) or "setup_args" not in registry or not isinstance(
                init_params, dict) or not isinstance(init_params.get("non_kwargs"), dict):
            raise ModelFileError(f"{dir_path}/model.json has a malformed registry or init "
                                 "parameters.")
        if adata is None and os.path.exists(os.path.join(dir_path, ADATA_FILE)):
            import anndata

            adata = anndata.read_h5ad(os.path.join(dir_path, ADATA_FILE))
        if adata is False:
            adata = None
        if adata is not None:
            check_genes(adata, np.asarray(attributes["var_names"], dtype=str))
            cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
        try:
            model = cls(adata, registry=registry if adata is None else None,
                        **init_params["non_kwargs"])
        except TypeError as err:
            raise ModelFileError(f"{dir_path}/model.json has unexpected init parameters: "
                                 f"{err}") from err
        try:
            model.module.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            raise ModelFileError(
                f"The weights in {dir_path} do not fit the model its model.json describes "
                f"(missing, unexpected or mis-shaped tensors): {err}") from err
        restore_attributes(model, attributes, _SAVED_ATTRIBUTES, dir_path)
        _, _, torch_device = parse_device_args(accelerator=accelerator, devices=device,
                                               return_device="torch",
                                               validate_single_device=True)
        model.to_device(torch_device)
        model.module.eval()
        return model

    @classmethod
    def load_registry(cls, dir_path: str, prefix: str | None = None) -> dict:
        """The registry (setup arguments, fields, versions) of a model saved by
        :meth:`save`, read from its ``model.json`` without loading weights or data."""
        if prefix is not None:
            raise ValueError("prefix is not supported by LapDDPM; use dir_path.")
        _, attributes = read_model_dir(resolve_model_dir(dir_path), weights=False)
        registry = attributes.get("registry_")
        if not isinstance(registry, dict) or "setup_args" not in registry:
            raise ModelFileError(f"{dir_path}/model.json has no registry.")
        return registry

    @classmethod
    def view_setup_args(cls, dir_path: str, prefix: str | None = None) -> None:
        """Print the arguments :meth:`setup_anndata` was called with for a saved model."""
        import rich.pretty  # noqa: F401  scvi-tools' printer uses it without importing it

        AnnDataManager.view_setup_method_args(cls.load_registry(dir_path, prefix))

    def __repr__(self) -> str:
        trained = "trained" if self.is_trained_ else "untrained"
        return f"{self._model_summary_string} ({trained})"

