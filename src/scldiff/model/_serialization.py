"""Model files without pickle: tensors in safetensors, everything else in JSON.

A model directory holds ``model.safetensors`` (the module's state dict) and
``model.json`` (init parameters, registry, var names, history, library-size fit). Neither
format can carry code: ``safetensors`` stores raw numeric buffers, and the JSON decoder
only rebuilds numbers, strings, lists, dicts and numeric/string numpy arrays.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
ADATA_FILE = "adata.h5ad"
BACKUP_SUFFIX = ".scldiff-previous"
FORMAT_VERSION = 2
_ARRAY_TAG = "__ndarray__"
_FRAME_TAG = "__dataframe__"
_ALLOWED_KINDS = set("biufUSO")


class ModelFileError(ValueError):
    """A model directory that cannot be loaded safely (corrupt, tampered or foreign)."""


def _encode(obj):
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _ALLOWED_KINDS:
            raise TypeError(f"Cannot store an array of dtype {obj.dtype} in a model file.")
        kind = "str" if obj.dtype.kind in "USO" else obj.dtype.str
        values = obj.astype(str).tolist() if kind == "str" else obj.tolist()
        return {_ARRAY_TAG: values, "dtype": kind, "shape": list(obj.shape)}
    if isinstance(obj, pd.DataFrame):
        data = obj.to_numpy()
        if data.dtype == object:  # e.g. training history: floats stored as Python objects
            try:
                data = data.astype(np.float64)
            except (TypeError, ValueError):
                data = data.astype(str)
        return {_FRAME_TAG: {"index": _encode(obj.index.to_numpy()),
                             "index_name": obj.index.name,
                             "columns": [str(c) for c in obj.columns],
                             "data": _encode(data)}}
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"Cannot store a {type(obj).__name__} in a model file.")


def _decode(obj):
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _ARRAY_TAG in obj:
        dtype = obj.get("dtype")
        if dtype == "str":
            array = np.asarray(obj[_ARRAY_TAG], dtype=str)
        else:
            np_dtype = np.dtype(dtype)
            if np_dtype.kind not in "biuf":
                raise ModelFileError(f"model.json holds an array of forbidden dtype {dtype!r}.")
            array = np.asarray(obj[_ARRAY_TAG], dtype=np_dtype)
        return array.reshape(obj.get("shape", array.shape))
    if _FRAME_TAG in obj:
        spec = obj[_FRAME_TAG]
        frame = pd.DataFrame(_decode(spec["data"]), columns=spec["columns"],
                             index=_decode(spec["index"]))
        frame.index.name = spec.get("index_name")
        return frame
    return {k: _decode(v) for k, v in obj.items()}


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns ``False`` where the system cannot (another OS, an old kernel or file system).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), b)


def write_model_dir(
    dir_path: str, state_dict: dict[str, torch.Tensor], attributes: dict,
    write_adata=None, overwrite: bool = False,
) -> None:
    """Write a model directory atomically: build it beside ``dir_path``, then swap it in.

    Everything is written to a staging directory first. A new directory is renamed into
    place; an existing one is exchanged with the staging directory in one atomic step
    (Linux), so an interruption at any point leaves the old model or the new one. Where
    the system cannot exchange, the old directory is first renamed to
    ``<dir_path>.scldiff-previous``, and :func:`read_model_dir` falls back to it if the
    save was interrupted between the two renames.
    """
    dir_path = os.path.abspath(dir_path)
    if os.path.exists(dir_path) and not overwrite:
        raise ValueError(f"{dir_path} already exists; pass overwrite=True or another path.")
    parent = os.path.dirname(dir_path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".scldiff-save-", dir=parent)
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, os.path.join(staging, MODEL_WEIGHTS))
        payload = {"format_version": FORMAT_VERSION, **_encode(attributes)}
        with open(os.path.join(staging, MODEL_JSON), "w") as handle:
            json.dump(payload, handle)
        if write_adata is not None:
            write_adata(os.path.join(staging, ADATA_FILE))
        backup = dir_path + BACKUP_SUFFIX
        if not os.path.exists(dir_path):
            os.rename(staging, dir_path)
        elif not _exchange(staging, dir_path):  # staging holds the old model after a swap
            shutil.rmtree(backup, ignore_errors=True)
            os.rename(dir_path, backup)
            os.rename(staging, dir_path)
        shutil.rmtree(backup, ignore_errors=True)  # also one an interrupted save left
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_model_dir(dir_path: str) -> str:
    """``dir_path``, or the previous model if a save that was replacing it was interrupted."""
    backup = os.path.abspath(dir_path) + BACKUP_SUFFIX
    if not os.path.exists(dir_path) and os.path.isdir(backup):
        warnings.warn(
            f"{dir_path} is missing but {backup} holds the model a save was replacing when it "
            "was interrupted; loading that one. Save again to restore the directory.",
            UserWarning, stacklevel=3,
        )
        return backup
    return dir_path


def read_model_dir(dir_path: str, weights: bool = True
                   ) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """Read the tensors (``None`` with ``weights=False``) and attributes of a model
    directory, refusing anything unsafe."""
    weights_path = os.path.join(dir_path, MODEL_WEIGHTS)
    meta = os.path.join(dir_path, MODEL_JSON)
    for path in (weights_path, meta):
        if not os.path.isfile(path):
            raise ModelFileError(
                f"{path} is missing: {dir_path} is not an scldiff model directory "
                "(expected model.safetensors and model.json, written by LapDDPM.save)."
            )
    state_dict = None
    try:
        if weights:
            state_dict = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(
            f"{weights_path} is not a valid safetensors file ({err}); it may be corrupt or "
            "not an scldiff model (pickled files are refused)."
        ) from err
    try:
        with open(meta) as handle:
            attributes = _decode(json.load(handle))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as err:
        raise ModelFileError(f"{meta} is not valid scldiff model metadata ({err}).") from err
    version = attributes.get("format_version") if isinstance(attributes, dict) else None
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{meta} has format_version {version!r}, and this scldiff reads "
            f"{FORMAT_VERSION} only: the model was saved by another version of scldiff. "
            "Train it again with this one (or load it with the version that saved it).")
    return state_dict, attributes


def restore_attributes(model, attributes: dict, names: tuple[str, ...], dir_path: str) -> None:
    """Set a loaded model's saved attributes ``names`` from its ``model.json``, and rebuild
    its LSI check and library-size model; ``ModelFileError`` for damaged ones."""
    from ._library import LibrarySizeModel
    from ._multiome import chromatin_of

    for name in names:
        if name in attributes:
            setattr(model, name, attributes[name])
    try:
        if model.modality_key:
            chromatin_of(model.lsi_ if isinstance(model.lsi_, dict) else {})
    except ValueError as err:
        raise ModelFileError(f"{dir_path}: the LSI in its model.json is damaged ({err}); "
                             "save the model again.") from err
    if attributes["library_model_"] is None:
        return
    try:
        combinations = model.combinations_
        if not isinstance(combinations, dict) or not isinstance(combinations.get("codes"),
                                                                list):
            raise ValueError("the training combinations of attributes are missing")
        model.library_model_ = LibrarySizeModel.from_dict(
            attributes["library_model_"], model.module.n_latent,
            len(combinations["codes"]) + 1)
    except ValueError as err:
        raise ModelFileError(f"{dir_path}: the library-size model in its model.json is "
                             f"damaged ({err}); save the model again from the trained "
                             "one.") from err
