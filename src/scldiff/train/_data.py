"""Minibatches for the two training stages, as Lightning data modules (plain arrays in)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from ..graph import SubgraphSampler, _matrix, log_normalize
from ..graph._matrix import as_csr, is_in_memory, row_chunks, row_reader, row_sums
from ..module import BATCH_KEYS, LATENT_KEYS


class EpochBatchSampler(Sampler):
    """Minibatches of positions ``0..n-1``, shuffled by ``(seed, epoch)`` alone.

    The order of an epoch does not depend on any global random state, so a run resumed
    from a checkpoint sees the same batches as an uninterrupted one. Lightning calls
    :meth:`set_epoch` before each epoch.

    Parameters
    ----------
    n
        Number of items.
    batch_size
        Items per batch.
    shuffle
        Shuffle each epoch (else in order).
    drop_last
        Drop a last incomplete batch (only when there is more than one batch).
    seed
        Seed of the shuffles.
    num_replicas, rank
        Distributed training: the epoch's permutation is shared by all ranks and rank ``r``
        takes positions ``r, r + num_replicas, ...`` of it, so ranks draw disjoint items.
        Each rank gets ``n // num_replicas`` items (the permutation's last ``n %
        num_replicas`` items sit the epoch out; they differ from epoch to epoch), so all
        ranks run the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, "
                             f"num_replicas={num_replicas}.")
        if num_replicas > 1 and n < num_replicas:
            raise ValueError(f"{n} items cannot be shared among {num_replicas} ranks; use "
                             f"fewer devices or more cells.")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.n_rank = n // num_replicas
        self.drop_last = drop_last and self.n_rank > batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n_rank // self.batch_size
        return -(-self.n_rank // self.batch_size)

    def __iter__(self):
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
                 if self.shuffle else np.arange(self.n))
        order = order[self.rank : self.n_rank * self.num_replicas : self.num_replicas]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size].tolist()


def _replicas(datamodule: LightningDataModule) -> tuple[int, int]:
    """``(world_size, global_rank)`` of the trainer running ``datamodule`` (1, 0 outside)."""
    trainer = datamodule.trainer
    if trainer is None:
        return 1, 0
    return trainer.world_size, trainer.global_rank


def _loader_generator(seed: int) -> torch.Generator:
    """The generator of a DataLoader's own seed (for workers): without one, iterating a
    DataLoader draws from torch's global generator, which a library must leave alone."""
    return torch.Generator().manual_seed(int(seed))


class _Indices(Dataset):
    """A map-style dataset of cell indices, read through :class:`EpochBatchSampler`."""

    def __init__(self, indices: np.ndarray):
        self.indices = np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return self.indices.size

    def __getitem__(self, i: int) -> int:
        return int(self.indices[i])


class SubgraphCollator:
    """Turn a list of seed cells into the tensors of their subgraph (see ``BATCH_KEYS``).

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts: a CSR matrix, or a backed matrix
        (``read_h5ad(..., backed="r")``), whose rows are then read for each minibatch so
        that the whole matrix is never in memory.
    attributes
        ``(n_cells, n_attributes)`` float32 attribute rows: categorical codes, then
        standardised continuous covariates.
    lpe
        ``(n_cells, n_lpe)`` Laplacian positional encodings.
    sampler
        Builds the seed cells' neighbourhood subgraph.
    """

    def __init__(self, counts, attributes: np.ndarray, lpe: np.ndarray,
                 sampler: SubgraphSampler):
        if is_in_memory(counts):
            counts = as_csr(counts)
            # int64 indices once, so that slicing rows needs no conversion per batch
            self.counts = sp.csr_matrix((counts.data, counts.indices.astype(np.int64),
                                         counts.indptr.astype(np.int64)), shape=counts.shape)
            # the encoder's input, computed once: same sparsity structure as the counts
            self.inputs = log_normalize(self.counts)
        else:
            self.counts, self.inputs = counts, None
        self._read_rows = row_reader(self.counts)
        self.attributes = np.asarray(attributes, dtype=np.float32).reshape(
            counts.shape[0], -1)
        self.lpe = np.asarray(lpe, dtype=np.float32)
        self.library = row_sums(self.counts).astype(np.float32)
        self.sampler = sampler

    def input_blocks(self, chunk_size: int | None = None) -> Iterator[sp.csr_matrix]:
        """The encoder's input (log-normalised expression) of all cells, in consecutive
        blocks of rows read sequentially (default ``ROW_CHUNK`` rows per block)."""
        chunk_size = _matrix.ROW_CHUNK if chunk_size is None else chunk_size
        if self.inputs is not None:
            for start in range(0, self.inputs.shape[0], chunk_size):
                yield self.inputs[start : start + chunk_size]
            return
        for block in row_chunks(self.counts, chunk_size):
            yield log_normalize(block)

    def graph_batch(self, seeds: list[int]) -> dict[str, torch.Tensor]:
        """The subgraph of ``seeds`` without expression: the cell index of each node
        (``NODES``) instead, for a pass that reads the expression once per cell
        (:meth:`input_blocks`) rather than once per subgraph the cell falls in."""
        seeds = np.asarray(seeds, dtype=np.int64)
        sub = self.sampler(seeds)
        return {
            BATCH_KEYS.ATTRIBUTES: torch.from_numpy(self.attributes[seeds]),
            BATCH_KEYS.NODES: torch.from_numpy(np.asarray(sub.nodes, dtype=np.int64)),
            **self._graph_tensors(sub),
        }

    def _graph_tensors(self, sub) -> dict[str, torch.Tensor]:
        return {
            BATCH_KEYS.LPE: torch.from_numpy(self.lpe[sub.nodes]),
            BATCH_KEYS.EDGE_INDEX: torch.from_numpy(sub.edge_index),
            BATCH_KEYS.EDGE_WEIGHT: torch.from_numpy(sub.edge_weight),
            BATCH_KEYS.DEGREE_OUTSIDE: torch.from_numpy(sub.degree_outside),
        }

    def __call__(self, seeds: list[int]) -> dict[str, torch.Tensor]:
        seeds = np.asarray(seeds, dtype=np.int64)
        sub = self.sampler(seeds)  # the seeds come first among the nodes
        if self.inputs is not None:
            x = self.inputs[sub.nodes]
            seed_counts = self.counts[seeds].data
        else:
            counts = self._read_rows(sub.nodes)
            seed_counts = counts[: seeds.size].data.copy()
            x = log_normalize(counts)
        return {
            BATCH_KEYS.ATTRIBUTES: torch.from_numpy(self.attributes[seeds]),
            BATCH_KEYS.NODE_CROW: torch.from_numpy(x.indptr.astype(np.int64, copy=False)),
            BATCH_KEYS.NODE_COL: torch.from_numpy(x.indices.astype(np.int64, copy=False)),
            BATCH_KEYS.NODE_INPUT: torch.from_numpy(x.data),
            BATCH_KEYS.SEED_COUNTS: torch.from_numpy(seed_counts),
            BATCH_KEYS.SEED_LIBRARY: torch.from_numpy(self.library[seeds]),
            **self._graph_tensors(sub),
        }


class SubgraphDataModule(LightningDataModule):
    """Stage A: shuffled seed cells, each batch with its neighbourhood subgraph.

    Attributes ``train_idx``, ``val_idx``, ``test_idx``, ``n_train`` and ``n_val`` follow
    :class:`scvi.dataloaders.DataSplitter`, which :class:`scvi.train.TrainRunner` reads.
    """

    def __init__(self, collator: SubgraphCollator, train_idx: np.ndarray, val_idx: np.ndarray,
                 batch_size: int = 128, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.collator = collator
        self.train_idx = np.asarray(train_idx, dtype=np.int64)
        self.val_idx = np.asarray(val_idx, dtype=np.int64)
        self.test_idx = np.zeros(0, dtype=np.int64)
        self.n_train, self.n_val = self.train_idx.size, self.val_idx.size
        self.batch_size = batch_size

    def _loader(self, indices: np.ndarray, shuffle: bool, replicas: tuple[int, int] = (1, 0),
                collate_fn=None) -> DataLoader:
        batches = EpochBatchSampler(len(indices), self.batch_size, shuffle, seed=self.seed,
                                    num_replicas=replicas[0], rank=replicas[1])
        return DataLoader(_Indices(indices), batch_sampler=batches,
                          collate_fn=self.collator if collate_fn is None else collate_fn,
                          generator=_loader_generator(self.seed))

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_idx, shuffle=True, replicas=_replicas(self))

    def val_dataloader(self) -> DataLoader | list:
        if not self.n_val:
            return []
        return self._loader(self.val_idx, shuffle=False, replicas=_replicas(self))

    def inference_loader(self, indices: np.ndarray | None = None) -> DataLoader:
        """Unshuffled encoding batches (:meth:`SubgraphCollator.graph_batch`: subgraphs
        without expression) of the given cells (default: the training cells)."""
        return self._loader(self.train_idx if indices is None else indices, shuffle=False,
                            collate_fn=self.collator.graph_batch)


class _Latents(Dataset):
    """Posterior parameters, indexed a whole minibatch at a time (no per-cell collation)."""

    def __init__(self, qz_mean: torch.Tensor, qz_logvar: torch.Tensor,
                 attributes: torch.Tensor):
        self.qz_mean, self.qz_logvar, self.attributes = qz_mean, qz_logvar, attributes

    def __len__(self) -> int:
        return self.attributes.shape[0]

    def __getitem__(self, index: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(index)
        return {LATENT_KEYS.QZ_MEAN: self.qz_mean[index],
                LATENT_KEYS.QZ_LOGVAR: self.qz_logvar[index],
                LATENT_KEYS.ATTRIBUTES: self.attributes[index]}

    def loader(self, batch_size: int, shuffle: bool, seed: int = 0,
               replicas: tuple[int, int] = (1, 0)) -> DataLoader:
        batches = EpochBatchSampler(len(self), batch_size, shuffle, drop_last=shuffle,
                                    seed=seed, num_replicas=replicas[0], rank=replicas[1])
        return DataLoader(self, sampler=batches, batch_size=None,
                          generator=_loader_generator(seed))


class LatentDataModule(LightningDataModule):
    """Stage B: posterior parameters of the training cells (the encoder is frozen)."""

    @classmethod
    def of_cells(cls, train_posterior: tuple[torch.Tensor, torch.Tensor],
                 val_posterior: tuple[torch.Tensor, torch.Tensor] | None,
                 attributes: np.ndarray,
                 train_idx: np.ndarray, val_idx: np.ndarray, batch_size: int, seed: int
                 ) -> LatentDataModule:
        """The data module of the training (and validation) cells' posteriors, with the
        attribute rows ``attributes`` of all cells."""
        attributes = torch.from_numpy(np.asarray(attributes, dtype=np.float32))
        val = None if val_posterior is None else (*val_posterior, attributes[val_idx])
        return cls((*train_posterior, attributes[train_idx]), val, batch_size, seed=seed)

    def __init__(self, train: tuple[torch.Tensor, ...], val: tuple[torch.Tensor, ...] | None,
                 batch_size: int = 256, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.train_set = _Latents(*train)
        self.val_set = _Latents(*val) if val is not None and len(val[2]) else None
        self.n_train = len(self.train_set)
        self.n_val = len(self.val_set) if self.val_set is not None else 0
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return self.train_set.loader(self.batch_size, shuffle=True, seed=self.seed,
                                     replicas=_replicas(self))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self.val_set.loader(self.batch_size, shuffle=False, replicas=_replicas(self))
