"""precision.py: the one table of dtype names and the CPU fallback every front end shares."""

import re
import warnings
from pathlib import Path

import pytest
import torch

from ldznet_ext.errors import LdznetError
from ldznet_ext.precision import (
    DTYPES,
    PRECISIONS,
    autocast,
    autocast_dtype,
    compute_dtype,
    dtype_named,
    resolve_dtype,
)

PACKAGE = Path(__file__).resolve().parents[1] / "ldznet_ext"


def test_names_and_torch_spellings():
    assert PRECISIONS == ("fp32", "fp16", "bf16")
    assert [dtype_named(n) for n in ("fp32", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]
    assert dtype_named("bfloat16") is torch.bfloat16 and dtype_named("float32") is torch.float32
    with pytest.raises(LdznetError, match=r"unknown dtype 'fp8': expected one of fp32, fp16, bf16"):
        dtype_named("fp8")


def test_fp16_on_cpu_computes_in_fp32():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.warns(UserWarning, match="fp16 is not supported on the CPU"):
        assert resolve_dtype("fp16", cpu) is torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compute_dtype(torch.float16, cpu) is torch.float32  # silent unless asked
        assert resolve_dtype("bf16", cpu) is torch.bfloat16
        assert compute_dtype(torch.float16, cuda) is torch.float16


def test_autocast_dtype():
    assert [autocast_dtype(n) for n in PRECISIONS] == [None, torch.float16, torch.bfloat16]


def test_one_dtype_table_in_the_package():
    """Names map to dtypes in precision.py only (the review found four tables)."""
    table = re.compile(r"[\"'](fp16|bf16|float16|bfloat16)[\"']\s*:\s*(torch\.)?\w+")
    holders = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if table.search(p.read_text()))
    assert holders == ["precision.py"]
    assert set(DTYPES) == set(PRECISIONS)


def test_float32_or_no_autocast_enters_no_torch_autocast(monkeypatch):
    """torch < 2.3 refuses float32 as the CPU's autocast dtype even in a disabled autocast: every fp32
    training run failed on the torch 2.1 that A1111 v1.10 installs."""
    entered = []
    monkeypatch.setattr(torch, "autocast", lambda device_type, dtype: entered.append((device_type, dtype)))
    cpu = torch.device("cpu")
    with autocast(cpu, None), autocast(cpu, torch.float32):
        pass
    assert entered == []
    autocast(cpu, torch.bfloat16)
    assert entered == [("cpu", torch.bfloat16)]
