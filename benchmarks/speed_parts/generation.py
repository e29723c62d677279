"""Generation of 10,000 PBMC3K cells: ``generate()`` and its parts, next to scVI's prior
sampling; on a GPU one batch profiled part by part."""

from __future__ import annotations

import inspect
import time

import numpy as np
import scipy.sparse as sp
import torch

from .common import LABELS, accelerator, device, sync, train_pbmc3k


def scvi_prior_sampler(adata, epochs: int):
    """A briefly trained scVI (labels as covariate) and a function sampling its prior:
    z ~ N(0, I), the decoder, Gamma-Poisson counts."""
    import scvi

    scvi.settings.seed = 0
    data = adata.copy()
    scvi.model.SCVI.setup_anndata(data, categorical_covariate_keys=[LABELS])
    model = scvi.model.SCVI(data)
    model.train(max_epochs=epochs, enable_progress_bar=False, accelerator=accelerator())
    model.module.eval()
    codes_all = data.obs[LABELS].cat.codes.to_numpy()
    library = np.asarray(data.X.sum(1)).ravel()
    on = model.device

    def sample(n: int, seed: int = 0) -> sp.csr_matrix:
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, data.n_obs, n)
        with torch.no_grad():
            z = torch.from_numpy(rng.standard_normal((n, model.module.n_latent))).float()
            out = model.module.generative(
                z=z.to(on),
                library=torch.log(torch.from_numpy(library[pick]).float())[:, None].to(on),
                batch_index=torch.zeros(n, 1, dtype=torch.long, device=on),
                cat_covs=torch.from_numpy(codes_all[pick].astype(np.int64))[:, None].to(on))
            if on.type != "cpu":  # Gamma-Poisson draws on the device, sparse back
                torch.manual_seed(seed)  # torch's Gamma sampler takes no generator
                mu, theta = out["px"].mu, out["px"].theta
                rate = torch.distributions.Gamma(theta.expand_as(mu), theta / mu).sample()
                counts = torch.poisson(rate).to_sparse_csr()
                return sp.csr_matrix((counts.values().cpu().numpy(),
                                      counts.col_indices().cpu().numpy(),
                                      counts.crow_indices().cpu().numpy()), shape=(n, mu.shape[1]))
            mu, theta = out["px"].mu.double().numpy(), out["px"].theta.double().numpy()
        return sp.csr_matrix(rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32))

    return sample


def _times(function, repeats: int) -> list[float]:
    """Seconds of ``function(r)`` for ``r`` in ``range(repeats)``, each waiting for the
    device."""
    times = []
    for r in range(repeats):
        sync()
        start = time.perf_counter()
        function(r)
        sync()
        times.append(time.perf_counter() - start)
    return times


def _best(function, repeats: int) -> float:
    return min(_times(function, repeats))


def bench_generation(n_cells: int, repeats: int, epochs: tuple[int, int]) -> dict:
    """Best-of-``repeats`` seconds of ``generate()`` of ``n_cells`` cells, in float32 and in
    bf16, of its parts, and of scVI's prior sampling, in one process."""
    model = train_pbmc3k(*epochs)
    model.generate(n_samples=min(n_cells, 500), seed=0, progress_bar=False)  # warm-up
    generated = model.generate(n_samples=n_cells, seed=0, progress_bar=False)
    walls = _times(lambda r: model.generate(n_samples=n_cells, seed=r, progress_bar=False),
                   repeats)
    bf16 = _best(lambda r: model.generate(n_samples=n_cells, seed=r, progress_bar=False,
                                          precision="bfloat16"), repeats)
    guidance = inspect.signature(model.generate).parameters["guidance_scale"].default
    record = {"n_cells": n_cells, "n_genes": int(generated.n_vars),
              "sampler": generated.uns["scldiff"]["sampler"],
              "n_steps": generated.uns["scldiff"]["n_steps"],
              "lapddpm_seconds": min(walls), "lapddpm_all_seconds": walls,
              "lapddpm_cells_per_second": n_cells / min(walls),
              "lapddpm_seconds_bf16": bf16,
              "parts_seconds": _parts(model.module.eval(), n_cells, repeats, guidance)}
    if device() != "cpu":
        record["lapddpm_seconds_one_batch"] = _best(lambda r: model.generate(
            n_samples=n_cells, seed=r, batch_size=n_cells, progress_bar=False), repeats)
        record["draw_profile_seconds"] = _draw_profile(model.module, n_cells, repeats,
                                                       guidance)
    scvi_sample = scvi_prior_sampler(model.adata, epochs=max(1, epochs[0] // 2))
    scvi_sample(min(n_cells, 500))
    record["scvi_prior_seconds"] = _best(lambda r: scvi_sample(n_cells, seed=r), repeats)
    record["scvi_cells_per_second"] = n_cells / record["scvi_prior_seconds"]
    return record


def _parts(module, n_cells: int, repeats: int, guidance: float) -> dict:
    """Best-of-``repeats`` seconds of the latents, of the decoder with the count draws, and
    of the decoder's products alone (a floor of its cost), for ``n_cells`` cells of random
    labels in one batch."""
    rng = np.random.default_rng(0)
    codes = torch.from_numpy(
        rng.integers(0, module.score_net.n_categories[0], (n_cells, 1)).astype(np.float32))
    generator = np.random.default_rng(0) if device() == "cpu" else \
        torch.Generator(device=device()).manual_seed(0)
    chunk = 256 if device() == "cpu" else n_cells  # as decode_counts works
    library = torch.full((n_cells,), 2000.0)
    with torch.no_grad():
        z = module.sample_latents(codes, guidance)
        codes = codes.to(z.device)
        return {
            "latents": _best(lambda r: module.sample_latents(codes, guidance), repeats),
            "decoder and counts": _best(
                lambda r: module.decode_counts(z, library, generator, codes), repeats),
            "decoder products": _best(lambda r: [
                module.decoder(z[start : start + chunk],
                               module.categories(codes[start : start + chunk]), bias_apart=True)
                for start in range(0, n_cells, chunk)], repeats)}


def _draw_profile(module, n_cells: int, repeats: int, guidance: float) -> dict:
    """Where one batch of ``n_cells`` goes when the counts are drawn in torch (a GPU's
    path): the latents, the decoder, the dense selection with the exact zero test, the
    positive counts, and the CSR arrays' copy to the host, each between two device
    synchronisations (best of ``repeats`` for each part). The positive draws and the copy
    are timed by wrapping the sampler's functions for them."""
    from scldiff.sampling import _torch

    codes = torch.from_numpy(np.random.default_rng(0).integers(
        0, module.score_net.n_categories[0], (n_cells, 1)).astype(np.float32)).to(device())
    library = torch.full((n_cells, 1), 2000.0, device=device())
    generator = torch.Generator(device=device()).manual_seed(0)
    inside = {"positive draws": 0.0, "CSR to host": 0.0}
    wrapped = {"positive draws": "positive_draws", "CSR to host": "csr_from_tensors"}
    originals = {name: getattr(_torch, name) for name in wrapped.values()}

    def timed(part, function):
        def run(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = function(*args, **kwargs)
            sync()
            inside[part] += time.perf_counter() - start
            return out
        return run

    parts: dict[str, list[float]] = {}
    try:
        for part, name in wrapped.items():
            setattr(_torch, name, timed(part, originals[name]))
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first is a warm-up
                inside.update(dict.fromkeys(inside, 0.0))
                sync()
                start = time.perf_counter()
                z = module.sample_latents(codes, guidance)
                sync()
                latents = time.perf_counter()
                params = module.decoder(z, codes)
                sync()
                decoded = time.perf_counter()
                _torch.draw_counts_torch(params, library, generator)
                sync()
                drawn = time.perf_counter()
                times = {"latents": latents - start, "decoder": decoded - latents,
                         "dense selection and exact zero test":
                             drawn - decoded - sum(inside.values()), **inside}
                for part, seconds in times.items():
                    parts.setdefault(part, []).append(seconds)
    finally:
        for name, function in originals.items():
            setattr(_torch, name, function)
    return {part: min(seconds[1:]) for part, seconds in parts.items()}
