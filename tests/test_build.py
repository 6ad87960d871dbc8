"""Building the CUDA extension (persimmon_rt/_build.py): the compiler pick of setup.py and the compile on
first use of ops.py, exercised on the CPU with real and fake compilers and a stand-in for torch's loader."""

import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from persimmon_rt import _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="needs g++")


def fake_compiler(tmp_path, name, extra_flags):
    """A wrapper around g++ that adds `extra_flags`, as a toolchain configured differently would."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\nexec {GXX} \"$@\" {extra_flags}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@needs_gxx
def test_probe_tells_static_from_dynamic_libstdcxx(tmp_path):
    assert _build.links_libstdcxx_dynamically(GXX)
    assert not _build.links_libstdcxx_dynamically(fake_compiler(tmp_path, "static-g++", "-static-libstdc++"))
    assert not _build.links_libstdcxx_dynamically(fake_compiler(tmp_path, "broken-g++", "-no-such-flag"))
    assert not _build.links_libstdcxx_dynamically(str(tmp_path / "missing-g++"))


@needs_gxx
def test_setup_passes_over_a_cxx_that_links_libstdcxx_statically(tmp_path, capsys):
    static = fake_compiler(tmp_path, "static-g++", "-static-libstdc++")
    picked = _build.pick_cxx(env={"CXX": static})
    assert picked != static and _build.links_libstdcxx_dynamically(picked)
    assert f"CXX={static} links libstdc++ statically" in capsys.readouterr().err
    assert _build.pick_cxx(env={"CXX": GXX}) == GXX and capsys.readouterr().err == ""


def test_pick_cxx_refuses_in_one_line_when_no_compiler_works():
    which = {"/opt/gcc/bin/g++": "/opt/gcc/bin/g++", "c++": "/fake/bin/c++"}.get
    with pytest.raises(RuntimeError) as info:
        _build.pick_cxx(env={"CXX": "/opt/gcc/bin/g++"}, which=which, works=lambda path: False)
    message = str(info.value)
    assert "\n" not in message and "tried /opt/gcc/bin/g++, c++" in message and "PERSIMMON_RT_NO_CUDA=1" in message


def test_pick_cxx_takes_the_first_working_fallback():
    which = {"c++": "/fake/bin/c++", "g++": "/fake/bin/g++"}.get
    assert _build.pick_cxx(env={}, which=which, works=lambda path: path == "/fake/bin/g++") == "/fake/bin/g++"


def test_flags_match_what_the_extension_expects():
    flags = _build.compile_flags(["80", "90a"], debug=False, shell_quote=True)
    assert flags["cxx"] == ["-O3", "'-DPERSIMMON_RT_CUDA_ARCHS=\"80,90a\"'"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags["nvcc"] and "-G" not in flags["nvcc"]
    assert "'-DPERSIMMON_RT_CUDA_ARCHS=\"80,90a\"'" in flags["nvcc"]   # the launchers pick kernels by it
    assert _build.compile_flags(["90a"], debug=True, shell_quote=False)["cxx"] == \
        ["-O0", "-g", '-DPERSIMMON_RT_CUDA_ARCHS="90a"']
    assert _build.cuda_archs({"PERSIMMON_RT_CUDA_ARCH": "80,90a"}) == ["80", "90a"] and _build.cuda_archs({}) == ["90a"]
    assert os.path.join(ROOT, "csrc", "torch_bindings.cpp") in _build.sources()


def test_cpu_machine_never_compiles(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _build.load_on_first_use(env={}) is None


@pytest.fixture
def gpu_machine(monkeypatch):
    """torch as on a CUDA machine where the extension was not built at install."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_build, "gpu_archs", lambda: ["90a"])
    monkeypatch.setattr(_build, "pick_cxx", lambda env: "/usr/bin/g++")
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
    return cpp_extension


def test_gpu_machine_without_nvcc_gets_one_line_saying_how(gpu_machine, monkeypatch):
    monkeypatch.setattr(gpu_machine, "CUDA_HOME", None)
    with pytest.warns(UserWarning) as record:
        assert _build.load_on_first_use(env={}) is None
    message = str(record[0].message)
    assert "\n" not in message and "nvcc is not found" in message and "CUDA_HOME" in message
    assert _build.load_on_first_use(env={"PERSIMMON_RT_NO_CUDA": "1"}) is None


def test_gpu_machine_with_nvcc_compiles_on_first_use(gpu_machine, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(_build, "find_nvcc", lambda cuda_home: "/usr/local/cuda/bin/nvcc")
    calls = []

    def load(**kwargs):
        calls.append((kwargs, os.environ.get("CXX")))
        return "module"

    monkeypatch.setattr(gpu_machine, "load", load)
    monkeypatch.delenv("CXX", raising=False)
    assert _build.load_on_first_use(env={"XDG_CACHE_HOME": str(tmp_path)}) == "module"
    kwargs, cxx = calls[0]
    assert cxx == "/usr/bin/g++" and "CXX" not in os.environ        # set for the build only
    assert kwargs["name"] == "_C" and kwargs["sources"] == _build.sources()
    assert kwargs["build_directory"].startswith(str(tmp_path / "persimmon_rt"))
    assert "-gencode=arch=compute_90a,code=sm_90a" in kwargs["extra_cuda_cflags"]
    assert "compiling the CUDA extension for sm_90a on first use" in capsys.readouterr().err
    open(os.path.join(kwargs["build_directory"], "_C.so"), "w").close()       # built: later imports just load
    assert _build.load_on_first_use(env={"XDG_CACHE_HOME": str(tmp_path)}) == "module"
    assert capsys.readouterr().err == "" and len(calls) == 2

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension '_C'\nlong compiler output")

    monkeypatch.setattr(gpu_machine, "load", failing_load)
    with pytest.warns(UserWarning, match="compiling the CUDA extension failed \\(Error building extension '_C'\\)"):
        assert _build.load_on_first_use(env={"XDG_CACHE_HOME": str(tmp_path)}) is None


def test_setup_loads_the_helpers_without_the_package():
    code = ("import runpy, sys; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "persimmon_rt", result.stderr
