"""Reliability: atomic model files, bad input, numerical faults, reproducibility."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import replace

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
import torch
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from scipy.sparse.csgraph import connected_components

from scldiff import LapDDPM, ModelFileError
from scldiff.distributions import CountParams
from scldiff.model import _serialization as ser
from scldiff.model._constants import ADATA_KEYS
from scldiff.train import NonFiniteLossError

from .conftest import QUIET, small_pbmc


def _save(path, value: float, adata_writer=None):
    ser.write_model_dir(str(path), {"w": torch.full((3,), value)}, {"value": value},
                        write_adata=adata_writer, overwrite=True)


def _load_value(path) -> float:
    state, attributes = ser.read_model_dir(ser.resolve_model_dir(str(path)))
    assert float(state["w"][0]) == attributes["value"]  # weights and metadata agree
    return attributes["value"]


def _no_leftovers(parent):
    return [p for p in os.listdir(parent) if p.startswith(".scldiff-")] == []


class Interrupt(BaseException):
    """Stands in for Ctrl-C or a killed process."""


def _raise(*args, **kwargs):
    raise Interrupt


@pytest.mark.parametrize("where", ["weights", "metadata", "adata", "swap"])
def test_an_interrupted_save_leaves_the_old_model(tmp_path, monkeypatch, where):
    path = tmp_path / "model"
    _save(path, 1.0)
    writer = None
    if where == "weights":
        monkeypatch.setattr(ser, "save_file", _raise)
    elif where == "metadata":
        monkeypatch.setattr(ser.json, "dump", _raise)
    elif where == "adata":
        writer = _raise
    else:
        monkeypatch.setattr(ser, "_exchange", _raise)
    with pytest.raises(Interrupt):
        _save(path, 2.0, writer)
    monkeypatch.undo()
    assert _load_value(path) == 1.0
    assert _no_leftovers(tmp_path)
    _save(path, 3.0)
    assert _load_value(path) == 3.0


def test_overwrite_swaps_the_directories_in_one_step(tmp_path, monkeypatch):
    path = tmp_path / "model"
    _save(path, 1.0)
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(ser.os, "rename", lambda a, b: renames.append((a, b)) or
                        real_rename(a, b))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").touch()
    exchanges = ser._exchange(str(a), str(b))  # False where the system cannot
    assert exchanges == (b / "x").exists()
    _save(path, 2.0)
    if exchanges:
        assert renames == []  # nothing moved through a state without a model
    assert _load_value(path) == 2.0
    assert _no_leftovers(tmp_path) and not os.path.exists(str(path) + ser.BACKUP_SUFFIX)


@pytest.mark.parametrize("interrupt_after", [0, 1])
def test_without_an_atomic_exchange_an_interruption_still_leaves_a_loadable_model(
        tmp_path, monkeypatch, interrupt_after):
    path = tmp_path / "model"
    _save(path, 1.0)
    monkeypatch.setattr(ser, "_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(a, b):
        if len(calls) == interrupt_after:
            raise Interrupt
        calls.append(a)
        real_rename(a, b)

    monkeypatch.setattr(ser.os, "rename", rename)
    with pytest.raises(Interrupt):
        _save(path, 2.0)
    monkeypatch.undo()
    if interrupt_after == 1:  # between the renames: the model directory is missing
        assert not path.exists()
        with pytest.warns(UserWarning, match="interrupted"):
            assert _load_value(path) == 1.0
    else:
        assert _load_value(path) == 1.0
    assert _no_leftovers(tmp_path)
    _save(path, 3.0)  # the next save restores a normal directory
    assert _load_value(path) == 3.0 and not os.path.exists(str(path) + ser.BACKUP_SUFFIX)


def test_metadata_is_plain_json(tmp_path):
    path = tmp_path / "model"
    _save(path, 1.0)
    with open(path / ser.MODEL_JSON) as handle:
        assert json.load(handle)["value"] == 1.0


# --------------------------------------------------------------------------- training faults



TINY = dict(n_latent=4, n_hidden=16, score_hidden=16, score_blocks=1)
EPOCHS = dict(max_epochs_vae=3, max_epochs_diffusion=3, batch_size=64, batch_size_diffusion=64)


def _tiny_model(n_cells=400, n_genes=120):
    scvi.settings.seed = 0
    adata = small_pbmc(n_cells, n_genes)
    LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=5, n_lpe=4)
    return LapDDPM(adata, **TINY)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0.0 if atol == 0 else 1e-5,
                                   msg=key)


def test_training_twice_with_the_same_seed_gives_the_same_weights():
    first = _tiny_model()
    first.train(**EPOCHS, **QUIET)
    second = _tiny_model()
    second.train(**EPOCHS, **QUIET)
    _assert_same_weights(_weights(first), _weights(second))
    scvi.settings.seed = 1
    third = LapDDPM(second.adata, **TINY)
    third.train(**EPOCHS, **QUIET)
    assert not torch.equal(_weights(third)["decoder.scale.weight"],
                           _weights(first)["decoder.scale.weight"])


class _Crash(Callback):
    """Kills the run at the start of the given epoch of the given stage."""

    def __init__(self, stage, epoch):
        self.stage, self.epoch = stage, epoch

    def on_train_epoch_start(self, trainer, plan):
        if plan.stage == self.stage and trainer.current_epoch == self.epoch:
            raise Interrupt


@pytest.mark.parametrize("stage,train_size", [("A", 1.0), ("B", 1.0), ("B", 0.8)])
def test_a_run_resumed_from_a_checkpoint_ends_as_an_uninterrupted_one(
        tmp_path, monkeypatch, stage, train_size):
    # with a validation split, scvi-tools' Trainer would add a checkpoint callback that
    # monitors `validation_loss` (which stage B does not log) in scvi's logging directory
    monkeypatch.setattr(scvi.settings, "logging_dir", str(tmp_path / "scvi_log"))
    run = dict(EPOCHS, train_size=train_size)
    whole = _tiny_model()
    whole.train(**run, **QUIET)
    crashed = _tiny_model()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    with pytest.raises(Interrupt):
        crashed.train(**run, callbacks=[checkpoints, _Crash(stage, 2)], **QUIET)
    resumed = _tiny_model()  # a new session: fresh weights, another global seed
    scvi.settings.seed = 123
    resumed.train(**run, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), **QUIET)
    _assert_same_weights(_weights(whole), _weights(resumed), atol=1e-6)
    assert not (tmp_path / "scvi_log").exists()
    kw = dict(labels={"B cells": 20}, seed=0, progress_bar=False)
    assert (whole.generate(**kw).X != resumed.generate(**kw).X).nnz == 0


def test_resuming_refuses_a_checkpoint_that_carries_code(tmp_path):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"scldiff": {"stage": "A", "seed": 0}, "x": Payload()}, handle)
    model = _tiny_model()
    with pytest.raises(ModelFileError, match="refused"):
        model.train(**EPOCHS, ckpt_path=str(path), **QUIET)
    assert not marker.exists()
    with pytest.raises(ValueError, match="not a file"):
        model.train(**EPOCHS, ckpt_path=str(tmp_path / "none.ckpt"), **QUIET)


@pytest.mark.parametrize("stage,term", [("A", "reconstruction loss"), ("B", "diffusion loss")])
def test_a_nan_loss_stops_training_naming_the_term_and_keeps_the_last_weights(
        monkeypatch, stage, term):
    model = _tiny_model()
    module = model.module
    snapshot = {}

    class Watch(Callback):
        def on_train_batch_start(self, trainer, plan, batch, batch_idx):
            if plan.stage == stage and trainer.global_step == 4:
                snapshot.update(_weights(model))
                target = module.decoder if stage == "A" else module.score_net
                original = target.forward

                def poisoned(*args, **kwargs):
                    out = original(*args, **kwargs)
                    if isinstance(out, CountParams):
                        return replace(out, logits=out.logits * float("nan"))
                    return out * float("nan")

                monkeypatch.setattr(target, "forward", poisoned)

    with pytest.raises(NonFiniteLossError, match=rf"Stage {stage}.*{term} became NaN"):
        model.train(**EPOCHS, callbacks=[Watch()], **QUIET)
    monkeypatch.undo()
    after = _weights(model)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    _assert_same_weights(snapshot, after)
    assert not model.is_trained_


# --------------------------------------------------------------------------- bad input




def fingerprint(adata) -> str:
    """A digest of everything in an AnnData: matrix bytes, format, dtype, annotations."""
    x = adata.X
    parts = [type(x).__name__, str(x.dtype), x.shape]
    if sp.issparse(x):
        parts += [x.data.tobytes(), x.indices.tobytes(), x.indptr.tobytes()]
    else:
        parts.append(np.ascontiguousarray(x).tobytes())
    parts += [adata.obs, adata.var, sorted(adata.uns), {k: adata.obsm[k] for k in adata.obsm},
              {k: adata.obsp[k] for k in adata.obsp}, sorted(adata.layers)]
    return hashlib.sha256(pickle.dumps(parts)).hexdigest()


def _set(a, row, col, value):
    x = a.X.toarray()
    x[row, col] = value
    a.X = sp.csr_matrix(x)


def _relabel(a, values):
    a.obs["cell_type"] = pd.Categorical(values)


BAD_SETUPS = {
    "non-integer counts": (lambda a: _set(a, 0, 0, 1.5), {}, ValueError, "non-integer"),
    "log-normalised": (lambda a: setattr(a, "X", sp.csr_matrix(np.log1p(a.X.toarray()))), {},
                       ValueError, "normalised or log-transformed"),
    "negative": (lambda a: _set(a, 2, 3, -1), {}, ValueError, "negative"),
    "NaN": (lambda a: _set(a, 2, 3, np.nan), {}, ValueError, "NaN"),
    "Inf": (lambda a: _set(a, 2, 3, np.inf), {}, ValueError, "infinite"),
    "all-zero cell": (lambda a: _set(a, 4, slice(None), 0), {}, ValueError,
                      r"1 cells have no counts.*filter_cells"),
    "all-zero gene": (lambda a: _set(a, slice(None), 7, 0), {}, ValueError,
                      r"1 genes have no counts.*filter_genes"),
    "labels column missing": (lambda a: None, {"labels_key": "celltype"}, ValueError,
                              "not a column of adata.obs"),
    "labels with NaN": (lambda a: _relabel(a, [None] + list(a.obs["cell_type"][1:])), {},
                        ValueError, "1 missing values"),
    "a single cell per label": (lambda a: _relabel(a, [f"c{i}" for i in range(a.n_obs)]), {},
                                ValueError, "have a single cell"),
    "a label with one cell": (lambda a: _relabel(a, ["rare"] + ["common"] * (a.n_obs - 1)),
                              {}, ValueError,
                              r"1 category of adata.obs\['cell_type'\] has a single cell "
                              r"\(\['rare'\]\)"),
    "fewer cells than n_neighbors": (lambda a: None, {"n_neighbors": 400}, ValueError,
                                     "too few for a 400-nearest-neighbour graph"),
    "n_lpe >= cells": (lambda a: None, {"n_lpe": 60}, ValueError, "smaller n_lpe"),
    "n_neighbors not an integer": (lambda a: None, {"n_neighbors": 2.5}, ValueError,
                                   "n_neighbors must be an integer"),
    "layer missing": (lambda a: None, {"layer": "raw_counts"}, ValueError, "not in adata.layers"),
    "string counts": (lambda a: setattr(a, "X", a.X.toarray().astype(str)), {}, ValueError,
                      "numeric counts"),
}


def _small_counts(n_cells=60, n_genes=40, seed=0):
    adata = small_pbmc(200, n_genes, seed)[:n_cells].copy()
    adata = adata[:, np.asarray(adata.X.sum(0)).ravel() > 0].copy()
    keep = adata.obs["cell_type"].map(adata.obs["cell_type"].value_counts()) > 1
    return adata[keep.to_numpy()].copy()


@pytest.mark.parametrize("case", list(BAD_SETUPS))
def test_bad_input_raises_naming_the_fix_and_leaves_the_anndata_byte_identical(case):
    corrupt, kwargs, error, message = BAD_SETUPS[case]
    adata = _small_counts()
    corrupt(adata)
    before = fingerprint(adata)
    with pytest.raises(error, match=message):
        LapDDPM.setup_anndata(adata, **{"labels_key": "cell_type", "n_neighbors": 5,
                                        "n_lpe": 4, **kwargs})
    assert fingerprint(adata) == before


def test_setup_of_something_else_than_an_anndata_is_a_type_error():
    with pytest.raises(TypeError, match="adata must be an AnnData"):
        LapDDPM.setup_anndata(np.ones((10, 5)))


def _fit_generate(adata, **setup):
    LapDDPM.setup_anndata(adata, **{"labels_key": "cell_type", "n_neighbors": 5, "n_lpe": 4,
                                    **setup})
    model = LapDDPM(adata, **TINY)
    model.train(max_epochs_vae=1, max_epochs_diffusion=1, **QUIET)
    return model, model.generate(n_samples=12, seed=0, progress_bar=False)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc", "backed", "backed dense", "backed csc",
                                 "float64", "int32"])
def test_every_matrix_format_and_dtype_trains_and_generates(fmt, tmp_path):
    adata = _small_counts(120, 60)
    reference = adata.X.toarray()
    if fmt == "dense":
        adata.X = reference.copy()
    elif fmt == "csc":
        adata.X = sp.csc_matrix(adata.X)
    elif fmt == "float64":
        adata.X = adata.X.astype(np.float64)
    elif fmt == "int32":
        adata.X = sp.csr_matrix(reference.astype(np.int32))
    elif fmt.startswith("backed"):
        if fmt == "backed dense":
            adata.X = reference.copy()
        elif fmt == "backed csc":
            adata.X = sp.csc_matrix(adata.X)
        adata.write_h5ad(tmp_path / "a.h5ad")
        adata = anndata.read_h5ad(tmp_path / "a.h5ad", backed="r")
    if fmt == "backed csc":  # works, with a warning that CSR reads faster
        with pytest.warns(UserWarning, match="backed CSC matrix"):
            model, generated = _fit_generate(adata)
    else:
        model, generated = _fit_generate(adata)
    assert generated.shape == (12, adata.n_vars)
    x = generated.X.toarray()
    assert (x >= 0).all() and (x == np.round(x)).all()
    assert model.get_latent_representation().shape == (adata.n_obs, TINY["n_latent"])
    stored = adata.X[:] if fmt.startswith("backed") else adata.X
    stored = stored.toarray() if sp.issparse(stored) else np.asarray(stored)
    np.testing.assert_array_equal(stored, reference)  # the counts are left as they were


def test_a_disconnected_graph_gets_encodings_per_component_and_trains():
    rng = np.random.default_rng(0)
    x = np.zeros((80, 40))
    x[:40, :20] = rng.poisson(5.0, (40, 20))  # two groups without a gene in common
    x[40:, 20:] = rng.poisson(5.0, (40, 20))
    adata = anndata.AnnData(sp.csr_matrix(x.astype(np.float32)))
    adata.obs["cell_type"] = pd.Categorical(np.repeat(["a", "b"], 40))
    model, generated = _fit_generate(adata)
    n_components, _ = connected_components(adata.obsp[ADATA_KEYS.GRAPH], directed=False)
    assert n_components == 2
    lpe = adata.obsm[ADATA_KEYS.LPE]
    np.testing.assert_allclose(lpe.T @ lpe, np.eye(lpe.shape[1]), atol=1e-5)
    assert np.isfinite(generated.X.toarray()).all()


@given(data=st.data())
def test_random_small_count_matrices_train_and_generate_or_raise_documented_errors(data):
    n_cells = data.draw(st.integers(2, 40), label="cells")
    n_genes = data.draw(st.integers(1, 25), label="genes")
    counts = data.draw(st.lists(st.integers(0, 50), min_size=n_cells * n_genes,
                                max_size=n_cells * n_genes), label="counts")
    x = np.asarray(counts, dtype=np.float32).reshape(n_cells, n_genes)
    labels = data.draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n_cells,
                                max_size=n_cells), label="labels")
    n_neighbors = data.draw(st.integers(1, 6), label="n_neighbors")
    n_lpe = data.draw(st.integers(0, 4), label="n_lpe")
    adata = anndata.AnnData(sp.csr_matrix(x))
    adata.obs["cell_type"] = pd.Categorical(labels)
    before = fingerprint(adata)
    try:
        LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=n_neighbors,
                              n_pcs=min(5, n_genes), n_lpe=n_lpe)
    except ValueError as err:  # the documented refusals, each naming the fix
        assert any(s in str(err) for s in ("have no counts", "single cell", "too few for",
                                           "smaller n_lpe")), err
        assert fingerprint(adata) == before
        return
    model = LapDDPM(adata, **TINY)
    model.train(max_epochs_vae=1, max_epochs_diffusion=1, **QUIET)
    generated = model.generate(labels={labels[0]: 3}, seed=0, progress_bar=False)
    out = generated.X.toarray()
    assert out.shape == (3, n_genes) and (out >= 0).all() and (out == np.round(out)).all()


def test_a_label_category_without_training_cells_cannot_be_generated():
    adata = _small_counts(120, 60)
    adata.obs["cell_type"] = adata.obs["cell_type"].cat.add_categories(["Unseen"])
    model, _ = _fit_generate(adata)
    with pytest.raises(ValueError,
                       match=r"'cell_type' value\(s\) \['Unseen'\] had no training cells"):
        model.generate(labels={"Unseen": 3}, seed=0, progress_bar=False)
    with pytest.raises(ValueError, match=r"Unknown 'cell_type' value\(s\) \['Nope'\]"):
        model.generate(labels=["Nope"], seed=0, progress_bar=False)


def test_non_finite_latents_or_decoder_output_stop_generation_with_a_clear_error():
    # a model whose weights hold a NaN: no silently empty cells, an error naming the cause
    adata = _small_counts(120, 60)
    model, _ = _fit_generate(adata)
    with torch.no_grad():
        model.module.score_net.out.bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="latents are not finite"):
        model.generate(n_samples=5, seed=0, progress_bar=False)
    model, _ = _fit_generate(adata)
    with torch.no_grad():
        model.module.decoder.scale.weight[3, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="decoder's output is not finite"):
        model.generate(n_samples=5, seed=0, progress_bar=False)


def test_a_nan_gradient_stops_training_before_the_update():
    model = _tiny_model()
    weight = model.module.decoder.scale.weight
    snapshot = {}

    class Poison(Callback):
        def on_train_batch_start(self, trainer, plan, batch, batch_idx):
            if plan.stage == "A" and trainer.global_step == 3:
                snapshot.update(_weights(model))
                weight.register_hook(lambda grad: grad * float("nan"))

    with pytest.raises(NonFiniteLossError,
                       match=r"Stage A.*gradient of module\.decoder\.scale\.weight became NaN"):
        model.train(**EPOCHS, callbacks=[Poison()], **QUIET)
    _assert_same_weights(snapshot, _weights(model))  # the finite loss was never applied


def test_the_gradient_check_finds_a_single_non_finite_entry_and_nothing_else():
    from scldiff.train._plan_base import non_finite_gradient as check

    def grads(**poison):
        out = [("a", torch.randn(300, 40)), ("empty", torch.zeros(0)),
               ("b", torch.randn(7, dtype=torch.float64)), ("c", torch.randn(5, 5))]
        for name, (index, value) in poison.items():
            dict(out)[name].view(-1)[index] = value
        return out

    assert check(grads()) is None
    assert check([]) is None
    # finite extremes are finite: no square of them is taken
    assert check(grads(a=(0, 3e38), c=(24, -3e38), b=(6, 1e300))) is None
    # nor a gradient whose sum overflows
    assert check([("a", torch.full((4, 3), 3e38)), ("b", torch.full((2,), -3e38))]) is None
    for value in (float("nan"), float("inf"), -float("inf")):
        for index in (0, 12, -1):  # first, middle, last entry
            assert check(grads(a=(index * 500, value))) == "a"
            assert check(grads(c=(index, value))) == "c"
    assert check(grads(b=(3, float("nan")), c=(0, float("inf")))) == "b"


def test_epoch_batches_depend_on_seed_and_epoch_only():
    from scldiff.train import EpochBatchSampler

    def epoch(sampler, e):
        sampler.set_epoch(e)
        return list(sampler)

    a, b = EpochBatchSampler(10, 4, seed=3), EpochBatchSampler(10, 4, seed=3)
    torch.manual_seed(0)
    first = epoch(a, 2)
    torch.manual_seed(1)  # the global generator plays no part
    assert epoch(b, 2) == first and epoch(a, 2) == first
    assert epoch(a, 3) != first and epoch(EpochBatchSampler(10, 4, seed=4), 2) != first
    assert [len(x) for x in first] == [4, 4, 2] and sorted(sum(first, [])) == list(range(10))
    dropped = epoch(EpochBatchSampler(10, 4, drop_last=True), 0)
    assert [len(x) for x in dropped] == [4, 4]
    assert epoch(EpochBatchSampler(5, 2, shuffle=False), 7) == [[0, 1], [2, 3], [4]]


def test_a_run_after_a_crash_trains_every_network():
    # each stage freezes the other stage's networks while it runs (DDP needs it); a crash
    # must not leave them frozen for the next train()
    model = _tiny_model()
    with pytest.raises(Interrupt):
        model.train(**EPOCHS, callbacks=[_Crash("A", 1)], **QUIET)
    with pytest.raises(Interrupt):
        model.train(**EPOCHS, callbacks=[_Crash("B", 1)], **QUIET)
    before = {k: v.clone() for k, v in _weights(model).items()}
    model.train(**EPOCHS, **QUIET)
    after = _weights(model)
    assert all(p.requires_grad for p in model.module.parameters())
    for prefix in ("encoder.", "decoder.", "score_net."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix))


def test_same_seed_same_weights_at_a_size_where_default_kernels_are_not_deterministic():
    """Wider layers and more genes than the tiny model: with torch's default CPU kernels,
    two runs at one seed ended with different weights here, even on one thread."""
    def trained():
        scvi.settings.seed = 0
        adata = small_pbmc(400, 600)
        LapDDPM.setup_anndata(adata, labels_key="cell_type", n_neighbors=10, n_lpe=8)
        model = LapDDPM(adata, n_latent=8, n_hidden=64, score_hidden=16, score_blocks=1)
        model.train(max_epochs_vae=2, max_epochs_diffusion=1, **QUIET)
        return model

    before = torch.are_deterministic_algorithms_enabled()
    _assert_same_weights(_weights(trained()), _weights(trained()))
    assert torch.are_deterministic_algorithms_enabled() == before  # the user's setting is back
    # also after a run that fails
    model = _tiny_model()
    with pytest.raises(Interrupt):
        model.train(**EPOCHS, callbacks=[_Crash("A", 1)], **QUIET)
    assert torch.are_deterministic_algorithms_enabled() == before
