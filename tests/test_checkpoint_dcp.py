"""DCP backend: llmio_native.checkpoint.StorageWriter / StorageReader under torch.distributed.checkpoint."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from llmio_native.checkpoint import StorageReader, StorageWriter

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _save(sd, path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, storage_writer=StorageWriter(path, **kw))


def _load(sd, path, **kw):
    r = StorageReader(path, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=r)
    return r


def test_round_trip_smoke(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(64, 33, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16), "step": 3}
    _save(sd, tmp_path / "ck")
    out = {"w": torch.zeros(64, 33), "b": torch.zeros(7, dtype=torch.bfloat16), "step": 0}
    _load(out, tmp_path / "ck")
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"]) and out["step"] == 3
