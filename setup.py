"""Build persimmon_rt: the CUDA extension persimmon_rt._C when torch has CUDA and nvcc is found,
otherwise the pure-Python package (every op then runs on its PyTorch reference).

Always install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
The C++ compiler is $CXX when it links libstdc++ dynamically, else the first of c++, g++, /usr/bin/c++,
/usr/bin/g++ that does (see persimmon_rt/_build.py); without nvcc here, the extension is compiled on first
use on a GPU machine instead.

Environment switches:
  PERSIMMON_RT_CUDA_ARCH   semicolon-separated compute capabilities to build for (default "90a")
  PERSIMMON_RT_NO_CUDA=1   skip the extension even where it could be built
  PERSIMMON_RT_DEBUG=1     -O0 -g -lineinfo (host and device)
  MAX_JOBS                 parallel compile jobs (torch's ninja builder reads it)
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_helpers():
    """persimmon_rt/_build.py, loaded by path: importing the package would need its dependencies."""
    spec = importlib.util.spec_from_file_location("persimmon_rt_build", os.path.join(ROOT, "persimmon_rt", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension():
    if os.environ.get("PERSIMMON_RT_NO_CUDA") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    build = _build_helpers()
    if torch.version.cuda is None or build.find_nvcc(CUDA_HOME) is None:
        return [], {}
    try:
        os.environ["CXX"] = build.pick_cxx()     # torch's builder compiles and links with $CXX
    except RuntimeError as exc:
        sys.exit(f"persimmon_rt: {exc}")
    archs = build.cuda_archs()
    ext = CUDAExtension(
        name="persimmon_rt._C",
        sources=[os.path.relpath(s, ROOT) for s in build.sources(ROOT)],
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=build.compile_flags(archs, os.environ.get("PERSIMMON_RT_DEBUG") == "1", shell_quote=False),
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()

setup(
    packages=find_packages(include=["persimmon_rt", "persimmon_rt.*"]),
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
