"""Compile-check the torch-free CUDA sources with plain nvcc for sm_90a (no GPU, no torch headers needed).

Every launcher csrc/*.cu instantiates its kernels, and every csrc/kernels/*.cuh must compile on its own
(self-contained includes). Skipped where nvcc is absent.
"""

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = pathlib.Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


NVCC = _nvcc()
FLAGS = ["-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-O1", f"-I{CSRC}", "--expt-relaxed-constexpr"]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")


def _compile(args, tmp_path):
    result = subprocess.run([NVCC, *FLAGS, *args, "-c", "-o", str(tmp_path / "out.o")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_launcher_compiles(source, tmp_path):
    _compile([str(CSRC / source)], tmp_path)


@pytest.mark.parametrize("header", sorted(p.name for p in (CSRC / "kernels").glob("*.cuh")))
def test_kernel_header_is_self_contained(header, tmp_path):
    unit = tmp_path / "unit.cu"
    unit.write_text(f'#include "kernels/{header}"\n')
    _compile([str(unit)], tmp_path)
