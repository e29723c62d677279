"""Distributed training through Lightning: DDP on 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch

from scldiff.train import EpochBatchSampler


@pytest.mark.parametrize("n,replicas,batch_size", [(10, 2, 3), (11, 2, 4), (100, 3, 7),
                                                    (5, 5, 1)])
def test_ranks_draw_disjoint_equal_shares_of_each_epoch(n, replicas, batch_size):
    for epoch in (0, 1):
        shares = []
        for rank in range(replicas):
            sampler = EpochBatchSampler(n, batch_size, seed=3, num_replicas=replicas, rank=rank)
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            shares.append([i for b in batches for i in b])
        drawn = [i for share in shares for i in share]
        assert len(drawn) == len(set(drawn))  # disjoint, and no cell twice within a rank
        assert {len(share) for share in shares} == {n // replicas}
        assert set(drawn) <= set(range(n))
    # the ranks' shares are slices of the single-process epoch order
    whole = [i for b in EpochBatchSampler(n, n, seed=3) for i in b]
    first = [i for b in EpochBatchSampler(n, batch_size, seed=3, num_replicas=replicas,
                                          rank=0) for i in b]
    assert first == whole[0: replicas * (n // replicas): replicas]


def test_a_sampler_refuses_bad_ranks():
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="fewer devices"):
        EpochBatchSampler(1, 2, num_replicas=2, rank=0)


def test_ddp_training_on_two_cpu_processes(tmp_path):
    worker = os.path.join(os.path.dirname(__file__), "_ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, worker, str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    n_train = records[0]["n_train"]
    for stage in ("A", "B"):
        shares = [[i for b in r["batches"][stage] for i in b] for r in records]
        assert not set(shares[0]) & set(shares[1])  # each rank its own seed cells
        assert len(records[0]["batches"][stage]) == len(records[1]["batches"][stage])
        expected = n_train // 2 if stage == "A" else n_train // 2 // 32 * 32  # B drops last
        assert len(shares[0]) == len(shares[1]) == expected
    # gradients were averaged across ranks, so both hold the same weights
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], msg=key)
    generated = ad.read_h5ad(tmp_path / "generated.h5ad")
    assert generated.shape[0] == 10 and np.all(generated.X.data == np.round(generated.X.data))
