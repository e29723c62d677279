"""Keys of what :meth:`~scldiff.LapDDPM.setup_anndata` registers and stores in an AnnData."""

from __future__ import annotations

from typing import NamedTuple


class _REGISTRY_KEYS_NT(NamedTuple):
    """Keys of the fields registered by :meth:`scldiff.LapDDPM.setup_anndata`."""

    X_KEY: str = "X"
    LABELS_KEY: str = "labels"
    CAT_COVS_KEY: str = "extra_categorical_covs"  # as scvi-tools' REGISTRY_KEYS
    CONT_COVS_KEY: str = "extra_continuous_covs"
    LPE_KEY: str = "lpe"
    GRAPH_KEY: str = "graph"
    MODALITY_KEY: str = "modality"
    LSI_KEY: str = "lsi"


class _ADATA_KEYS_NT(NamedTuple):
    """Where ``setup_anndata`` stores the cell graph (and clusters) in the user's AnnData."""

    GRAPH: str = "scldiff_connectivities"  # adata.obsp
    LPE: str = "X_scldiff_lpe"  # adata.obsm
    GRAPH_PARAMS: str = "scldiff_graph"  # adata.uns
    CLUSTERS: str = "scldiff_cluster"  # adata.obs: clusters of cluster_labels=True
    CLUSTER_PARAMS: str = "scldiff_clusters"  # adata.uns
    LSI: str = "X_scldiff_lsi"  # adata.obsm: the cells' ATAC LSI embedding (multiome)
    LSI_FIT: str = "scldiff_lsi"  # adata.uns: the fitted LSI and its parameters


REGISTRY_KEYS = _REGISTRY_KEYS_NT()
ADATA_KEYS = _ADATA_KEYS_NT()

# generate()'s default joint guidance scale (docs "Benchmarks"), also the scale of the
# generated latents the post-guidance scorer is trained against
DEFAULT_GUIDANCE_SCALE = 1.5
# at most this many training cells (and as many generated ones) train the scorer
SCORER_MAX_CELLS = 5_000
# predict_perturbation()'s default noise level and compositional guidance scale of the
# changed covariate (docs "Benchmarks": the leave-one-cell-type-out benchmark on Kang 2018)
DEFAULT_PERTURBATION_STRENGTH = 0.5
DEFAULT_PERTURBATION_GUIDANCE = 3.0
# generate(spots=...)'s default share of a spot's starting noise shared with its neighbours
# (docs "Benchmarks": the spatial benchmark on DLPFC 151673)
DEFAULT_NOISE_COUPLING = 0.5
# the name of a multiome model's chromatin in generate()'s guidance_scale and provenance
CHROMATIN = "atac"
