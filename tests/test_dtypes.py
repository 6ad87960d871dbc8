"""The one dtype table (persimmon_rt.dtypes) and its parser."""

import pytest
import torch

from persimmon_rt.dtypes import DTYPES, default_dtype, dtype_name, parse_dtype


@pytest.mark.parametrize("value, want", [
    ("float16", torch.float16), ("torch.bfloat16", torch.bfloat16), ("fp32", torch.float32), ("BF16", torch.bfloat16),
    ("half", torch.float16), (torch.float32, torch.float32),
])
def test_parse_dtype(value, want):
    assert parse_dtype(value) is want and DTYPES[dtype_name(want)] is want


@pytest.mark.parametrize("value", ["int8", "float64", torch.int8, None, 16])
def test_parse_dtype_names_the_choices(value):
    with pytest.raises(ValueError, match="expected one of float16, bfloat16, float32"):
        parse_dtype(value)


def test_default_dtype_follows_the_device():
    assert default_dtype("cpu") is torch.float32 and default_dtype(torch.device("cuda", 1)) is torch.float16
