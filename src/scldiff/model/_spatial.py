"""``generate(spots=...)``: expression for the spots of a tissue section, each guided on its
position in the tissue, their starting noise coupled along the section's graph."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from ..graph import extend_encoding, join_isolated, lattice_spacing, spatial_graph
from ..graph._spatial import _check_coordinates
from ._attributes import Request
from ._constants import ADATA_KEYS
from ._setup import write_spatial_graph

# spots farther than this many lattice spacings from every training spot are extrapolated
_FAR_SPACINGS = 2.0


def check_noise_coupling(value) -> float:
    """``generate``'s ``noise_coupling`` as a float in [0, 1]; ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"noise_coupling must be a number in [0, 1], got {value!r}.")
    return float(value)


@dataclass
class Section:
    """The spots :meth:`generate` is asked for: their names, coordinates, positions as the
    diffusion reads them (``(n, P)``), neighbourhood graph (squidpy's connectivities and
    distances, and the model's with isolated spots joined) and the index of each one's
    nearest training spot."""

    names: pd.Index
    coordinates: np.ndarray
    positions: np.ndarray
    connectivities: sp.csr_matrix
    distances: sp.csr_matrix
    graph: sp.csr_matrix
    nearest: np.ndarray


class SpatialMixin:
    """The section generation of :class:`~scldiff.LapDDPM` (``generate(spots=...)``)."""

    def _wants_section(self, spots, labels, n_samples, conditions) -> bool:
        """Whether ``generate``'s arguments ask for a section: ``spots`` given, or a spatial
        model asked for nothing else (its training section's spots)."""
        if spots is None:
            return bool(self.spatial_key) and labels is None and n_samples is None \
                and conditions is None
        if not self.spatial_key:
            raise ValueError("spots needs a spatial model: set up the training AnnData with "
                             "spatial_key (the obsm key of the spots' coordinates).")
        if labels is not None or n_samples is not None or conditions is not None:
            raise ValueError("Pass spots alone: the spots' obs columns give their attributes, "
                             "so labels, n_samples and conditions must be None.")
        if not isinstance(spots, AnnData):
            raise TypeError(f"spots must be an AnnData, got {type(spots).__name__}.")
        return True

    def _generate_section(self, spots: AnnData | None, noise_coupling, keep_fraction: float,
                          sampling: dict, library_size: str, batch_size: int, seed: int,
                          precision: str, progress_bar: bool) -> AnnData:
        """``generate(spots=...)`` once its common arguments are checked: the section's
        positions and attribute rows, latents from coupled noise, the AnnData placed as the
        spots."""
        if keep_fraction < 1.0:
            raise ValueError("keep_fraction < 1 is not available for spots: the post-guidance "
                             "scorer knows no positions.")
        coupling = check_noise_coupling(noise_coupling)
        draw_seed, fill_seed = np.random.SeedSequence(seed).spawn(2)
        section = self._section(spots)
        request = self._section_request(spots, section, fill_seed)
        blocks, computed_in = self._draw_in_precision(
            precision, request, batch_size, draw_seed, progress_bar, library_size, sampling,
            1.0, section.positions, (coupling, section.graph))
        provenance = self._provenance(
            sampling, seed=seed, batch_size=int(batch_size), library_size=library_size,
            precision=computed_in, conditioned_on=[*request.given, self.spatial_key],
            noise_coupling=coupling, unseen_combinations=request.unseen)
        return self._section_anndata(
            self._counts_anndata(blocks, request.filled, "synthetic", provenance), section)

    def _section(self, spots: AnnData | None) -> Section:
        """:class:`Section` of ``spots`` (``None``: the training AnnData's), positions
        extended from the training spots' (:func:`~scldiff.graph.extend_encoding`)."""
        if self.adata is None:
            raise ValueError("Generating a section needs the training spots' positions: load "
                             "the model with its AnnData (LapDDPM.load(dir_path, adata)).")
        key = self.spatial_key
        spots = self.adata if spots is None else spots
        if spots.n_obs == 0:
            raise ValueError("spots has no spots (0 rows); give at least one position.")
        if key not in spots.obsm:
            raise ValueError(f"spots.obsm has no {key!r}: store the spots' coordinates there, "
                             "in the training section's frame.")
        try:
            xy = _check_coordinates(np.asarray(spots.obsm[key])) if spots.n_obs > 1 else \
                np.asarray(spots.obsm[key], dtype=np.float64).reshape(spots.n_obs, -1)
        except (TypeError, ValueError) as err:
            raise ValueError(f"spots.obsm[{key!r}]: {err}") from err
        train_xy = np.asarray(self.adata.obsm[key], dtype=np.float64)
        lpe = np.asarray(self.adata.obsm[ADATA_KEYS.LPE], dtype=np.float32)
        encoding, distance, nearest = extend_encoding(train_xy, lpe, xy)
        far = distance > _FAR_SPACINGS * lattice_spacing(train_xy)
        if far.any():
            warnings.warn(f"{int(far.sum())} spot(s) lie more than {_FAR_SPACINGS:g} spot "
                          "spacings from every training spot: their positions are taken "
                          "from the nearest training spots, a guess that coarsens with the "
                          "distance.", UserWarning,
                          stacklevel=3)
        settings = self.registry_["setup_args"]
        if spots.n_obs > 1:
            connectivities, distances = spatial_graph(
                xy, kind=settings.get("spatial_graph", "grid"),
                n_neighbors=min(settings.get("spatial_neighbors", 6), spots.n_obs - 1))
            graph = join_isolated(connectivities, xy)[0]
        else:
            connectivities = distances = graph = sp.csr_matrix((1, 1))
        return Section(spots.obs_names.copy(), xy, self._positions(encoding), connectivities,
                       distances, graph, nearest)

    def _section_request(self, spots: AnnData | None, section: Section,
                         seed: np.random.SeedSequence) -> Request:
        """The attribute rows of a section's spots (:meth:`_request_from_obs`, categorical
        attributes not given taken from each one's nearest training spot)."""
        spots = self.adata if spots is None else spots
        return self._request_from_obs(spots.obs, section.nearest, seed)

    def _section_anndata(self, synth: AnnData, section: Section) -> AnnData:
        """``synth`` named and placed as the section's spots: their ``obs_names``,
        coordinates in ``obsm`` and neighbourhood graph in ``obsp`` (squidpy's layout)."""
        synth.obs_names = section.names
        synth.obsm[self.spatial_key] = section.coordinates
        settings = self.registry_["setup_args"]
        write_spatial_graph(synth, section.connectivities, section.distances,
                            settings.get("spatial_graph", "grid"),
                            settings.get("spatial_neighbors", 6))
        return synth

