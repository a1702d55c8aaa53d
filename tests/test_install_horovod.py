"""distlaunch install-horovod: the C++17 patch, the refusals, and the result (when built)."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import horovod_available

from distlaunch.launch import horovod_build
from distlaunch.launch.horovod_build import BuildError, cache_key, check_toolchain, patch_cxx_standard


def test_patch_raises_the_cxx_standard(tmp_path):
    (tmp_path / "horovod" / "torch").mkdir(parents=True)
    (tmp_path / "CMakeLists.txt").write_text("project(x)\nset(CMAKE_CXX_STANDARD 14)\nfoo()\n")
    (tmp_path / "horovod" / "torch" / "CMakeLists.txt").write_text("set(CMAKE_CXX_STANDARD 14)\n")
    assert patch_cxx_standard(tmp_path) == ["CMakeLists.txt", "horovod/torch/CMakeLists.txt"]
    assert "set(CMAKE_CXX_STANDARD 17)" in (tmp_path / "CMakeLists.txt").read_text()
    assert "14" not in (tmp_path / "horovod" / "torch" / "CMakeLists.txt").read_text()
    assert patch_cxx_standard(tmp_path) == []  # idempotent


def test_refuses_without_cmake(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError, match="cmake not found: install it"):
        check_toolchain()


def test_refuses_without_compiler(monkeypatch, tmp_path):
    cmake = tmp_path / "cmake"
    cmake.write_text("#!/bin/sh\n")
    cmake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(BuildError, match="no C\\+\\+ compiler found"):
        check_toolchain()


def test_refuses_without_torch(monkeypatch):
    monkeypatch.setattr(horovod_build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BuildError, match="torch is not installed"):
        check_toolchain()


def test_cache_key_names_versions():
    tools = horovod_build.Toolchain(sys.executable, "2.13.0+cpu", False, "cmake", "g++", "/bin")
    key = cache_key(tools)
    assert key.startswith(f"horovod-0.28.1-torch2.13.0_cpu-cp{sys.version_info.major}{sys.version_info.minor}-env")
    assert len(key.rsplit("-env", 1)[1]) == 8  # one cache entry per environment (the wheel's run path)


@pytest.mark.skipif(not horovod_available(), reason="Horovod is not installed")
def test_check_build_reports_mpi_and_gloo():
    built = horovod_build.check_build()
    assert built["PyTorch"] and built["MPI"] and built["Gloo"]
    proc = subprocess.run([sys.executable, "-m", "distlaunch", "install-horovod"], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert "[X] MPI" in proc.stdout and "[X] Gloo" in proc.stdout
