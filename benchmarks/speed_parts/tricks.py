"""What each speed trick saves: the trick against the plain path it replaces, on PBMC3K-sized
inputs, in one process (docs "Performance" lists them with their tests)."""

from __future__ import annotations

import time

import numpy as np
import torch

from .common import train_pbmc3k


def _best(function, repeats: int = 7) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def _pair(trick, plain, repeats: int = 7) -> dict:
    """Best-of-``repeats`` seconds of the trick and of the plain path, alternating."""
    trick_times, plain_times = [], []
    trick(), plain()
    for _ in range(repeats):
        trick_times.append(_best(trick, 1))
        plain_times.append(_best(plain, 1))
    return {"trick_seconds": min(trick_times), "plain_seconds": min(plain_times)}


def bench_tricks(repeats: int = 7) -> dict:
    """Each trick and its plain path, on a briefly trained PBMC3K model and its minibatches."""
    from scldiff.distributions import sparse_log_likelihood
    from scldiff.module import BATCH_KEYS
    from scldiff.train import keep_mask
    from scldiff.train._plan_base import fused_adam_kwargs, non_finite_gradient

    model = train_pbmc3k(2, 2)
    module = model.module.eval()
    collator = model._collator()
    batch = collator(list(np.random.default_rng(0).choice(model.adata.n_obs, 128,
                                                          replace=False)))
    n_seed = batch[BATCH_KEYS.ATTRIBUTES].shape[0]
    counts = batch[BATCH_KEYS.SEED_COUNTS]
    crow = batch[BATCH_KEYS.NODE_CROW][: n_seed + 1]
    col = batch[BATCH_KEYS.NODE_COL][: counts.shape[0]]
    library = batch[BATCH_KEYS.SEED_LIBRARY][:, None]
    z = torch.randn(n_seed, module.n_latent)
    labels = module.categories(batch[BATCH_KEYS.ATTRIBUTES])
    dense = torch.zeros(n_seed, module.decoder.scale.out_features)
    dense[torch.repeat_interleave(torch.arange(n_seed), crow.diff()), col] = counts
    results = {}

    def loss(sparse: bool):
        def run():
            params = module.decoder(z.requires_grad_(), labels)
            value = sparse_log_likelihood(params, library, crow, col, counts) if sparse else \
                params.distribution(library).log_prob(dense).sum(-1)
            value.sum().backward()
        return run

    results["ZINB likelihood from the logits, forward and backward (128 cells)"] = _pair(
        loss(True), loss(False), repeats)

    rng_chunk = torch.from_numpy(np.random.default_rng(1).integers(0, 8, 256))
    with torch.no_grad():
        params = module.decoder(torch.randn(256, module.n_latent), rng_chunk, bias_apart=True)
    lib256 = torch.full((256,), 2000.0)
    from scldiff.sampling import draw_counts

    results["compiled CPU count sampler (256 cells)"] = _pair(
        lambda: draw_counts(params, lib256, np.random.default_rng(0)),
        lambda: draw_counts(params, lib256, torch.Generator().manual_seed(0)), repeats)

    _, _, out = module.train()(batch, loss_kwargs={"kl_weight": 1.0})
    out.loss.backward()
    named = [(n, p.grad) for n, p in module.eval().named_parameters() if p.grad is not None]
    module.zero_grad()
    results["gradient check by sums (stage A's gradients)"] = _pair(
        lambda: non_finite_gradient(named),
        lambda: [bool(torch.isfinite(g).all()) for _, g in named], repeats)

    n_input = batch[BATCH_KEYS.NODE_INPUT].shape[0]
    results[f"input mask from 16 random bits ({n_input:,} entries)"] = _pair(
        lambda: keep_mask(n_input, 0.1), lambda: (torch.rand(n_input) >= 0.1).float(), repeats)

    def projection(shared: bool):
        def run():
            with torch.no_grad():
                first = module.project_nodes(batch[BATCH_KEYS.NODE_CROW],
                                             batch[BATCH_KEYS.NODE_COL],
                                             batch[BATCH_KEYS.NODE_INPUT], n_seed)
                if not shared:  # the loss's pass projects again
                    module.project_nodes(batch[BATCH_KEYS.NODE_CROW], batch[BATCH_KEYS.NODE_COL],
                                         batch[BATCH_KEYS.NODE_INPUT], n_seed)
            return first
        return run

    results["input projection shared by a step's two passes"] = _pair(
        projection(True), projection(False), repeats)

    params_b = list(module.score_net.parameters())
    for p in params_b:
        p.grad = torch.randn_like(p)
    fused = torch.optim.AdamW(params_b, lr=1e-6, **fused_adam_kwargs(params_b))
    plain = torch.optim.AdamW(params_b, lr=1e-6)
    results["fused AdamW step (the ScoreNet)"] = _pair(fused.step, plain.step, repeats)

    net = module.score_net.eval()
    zs = torch.randn(8192, module.n_latent)
    codes = torch.from_numpy(np.random.default_rng(2).integers(
        0, net.n_categories[0] + 1, (8192, 1)).astype(np.float32))
    codes[codes == net.n_categories[0]] = float("nan")  # the null label
    t = torch.tensor(0.5)
    with torch.no_grad():
        results["ScoreNet conditions once per label (8,192 rows, one time)"] = _pair(
            lambda: net(zs, t, codes), lambda: net(zs, t.expand(8192), codes), repeats)

    lib = torch.full((4096,), 2000.0)
    zz = torch.randn(4096, module.n_latent)
    codes = torch.from_numpy(np.random.default_rng(3).integers(
        0, net.n_categories[0], (4096, 1)).astype(np.float32))

    def serial():
        threads = torch.get_num_threads()
        import scldiff.module._module as module_file

        workers = module_file._MAX_DECODE_WORKERS
        module_file._MAX_DECODE_WORKERS = 1
        try:
            module.decode_counts(zz, lib, np.random.default_rng(0), codes)
        finally:
            module_file._MAX_DECODE_WORKERS = workers
            torch.set_num_threads(threads)

    results["decoding and drawing in worker threads (4,096 cells)"] = _pair(
        lambda: module.decode_counts(zz, lib, np.random.default_rng(0), codes), serial, repeats)
    return {name: {**r, "saving": 1 - r["trick_seconds"] / r["plain_seconds"]}
            for name, r in results.items()}
