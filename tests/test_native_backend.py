"""The facade rag_service.kernels.native: what the extension was built with, CUDA probing, and backend selection through
RAG_SERVICE_BACKEND (resolved per call, so monkeypatching the environment is enough)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from rag_service.kernels import native
from rag_service.kernels.reference import fuse_reference

ENV = native.BACKEND_ENV
ARGS = (np.array([1, 2, 3], dtype=np.int64), np.array([3, 2, 1], dtype=np.float32),
        np.array([3, 5], dtype=np.int64), np.array([0.9, 0.1], dtype=np.float32))


@pytest.fixture
def spy_reference(monkeypatch):
    """Records the calls that reach the NumPy reference through the facade."""
    calls: list[int] = []

    def spy(*args, **kwargs):
        calls.append(1)
        return fuse_reference(*args, **kwargs)

    monkeypatch.setattr(native, "fuse_reference", spy)
    return calls


def test_extension_loaded(ext):
    assert native.HAS_NATIVE is True
    assert native.NATIVE_IMPORT_ERROR is None


def test_has_cuda_is_consistent_with_the_build(ext):
    assert isinstance(ext.HAS_CUDA, bool)
    assert isinstance(native.HAS_CUDA, bool)
    assert native.HAS_CUDA == ext.HAS_CUDA
    assert ("no CUDA" not in ext.BUILD_INFO) == ext.HAS_CUDA
    assert isinstance(ext.__version__, str) and ext.__version__


def test_cuda_device_count_never_raises(ext):
    count, reason = ext.cuda_device_count()
    assert isinstance(count, int) and isinstance(reason, str)
    assert count >= 0
    if count == 0:
        assert reason  # why not, e.g. "CUDA driver version is insufficient for CUDA runtime version"
    else:
        assert reason == ""
    if not ext.HAS_CUDA:
        assert (count, reason) == (0, "built without CUDA")
    assert ext.cuda_device_count() == (count, reason)  # asking again is fine


def test_cuda_device_status(ext):
    available, reason = native.cuda_device_status()
    assert isinstance(available, bool) and isinstance(reason, str)
    if available:
        assert native.HAS_CUDA
    else:
        assert reason
    assert native.cuda_device_status() == (available, reason)


def test_backend_info(ext, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    info = native.backend_info()
    assert set(info) == {"built_with_cuda", "cuda_device_available", "cuda_reason", "fusion_backend"}
    assert info["built_with_cuda"] is native.HAS_CUDA
    assert (info["cuda_device_available"], info["cuda_reason"]) == native.cuda_device_status()
    assert info["fusion_backend"] == "cpp"
    monkeypatch.setenv(ENV, "numpy")
    assert native.backend_info()["fusion_backend"] == "numpy"


@pytest.mark.parametrize("value", [None, "", "auto", " AUTO "])
def test_auto_prefers_cpp(value, ext, monkeypatch, spy_reference):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    assert native.requested_backend() == "auto"
    assert native.fusion_backend() == "cpp"
    native.fuse(*ARGS)
    assert spy_reference == []


def test_numpy_forces_the_reference(ext, monkeypatch, spy_reference):
    monkeypatch.setenv(ENV, "numpy")
    assert native.fusion_backend() == "numpy"
    got = native.fuse(*ARGS, method="rrf", top_k=3)
    assert spy_reference == [1]
    np.testing.assert_array_equal(got.ids, fuse_reference(*ARGS, method="rrf", dense_weight=0.5, top_k=3).ids)


def test_cpp_gives_the_extension(ext, monkeypatch, spy_reference):
    monkeypatch.setenv(ENV, "cpp")
    assert native.fusion_backend() == "cpp"
    native.fuse(*ARGS)
    assert spy_reference == []


def test_choice_is_made_per_call(ext, monkeypatch, spy_reference):
    monkeypatch.setenv(ENV, "numpy")
    native.fuse(*ARGS)
    monkeypatch.setenv(ENV, "cpp")
    native.fuse(*ARGS)
    assert spy_reference == [1]
    assert native.fusion_backend("numpy") == "numpy"  # an explicit choice wins over the environment
    monkeypatch.setenv(ENV, "numpy")
    assert native.fusion_backend("cpp") == "cpp"


def test_cuda_backend(ext, monkeypatch):
    monkeypatch.setenv(ENV, "cuda")
    available, reason = native.cuda_device_status()
    if available:  # a real device: fusion has no CUDA kernel and runs on C++
        assert native.fusion_backend() == "cpp"
        return
    with pytest.raises(RuntimeError) as raised:
        native.fusion_backend()
    message = str(raised.value)
    assert ENV in message
    if native.HAS_CUDA:
        assert reason in message
    else:
        assert "RAG_SERVICE_CUDA=ON" in message and "nvcc" in message
    with pytest.raises(RuntimeError):
        native.fuse(*ARGS)
    with pytest.raises(RuntimeError):
        native.backend_info()


def test_cuda_backend_without_cuda_build(ext, monkeypatch):
    monkeypatch.setattr(native, "HAS_CUDA", False)
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(RuntimeError, match=r"built without CUDA.*RAG_SERVICE_CUDA=ON"):
        native.fusion_backend()


def test_cuda_backend_without_device(ext, monkeypatch):
    monkeypatch.setattr(native, "HAS_CUDA", True)
    monkeypatch.setattr(native, "cuda_device_status", lambda: (False, "no device in this test"))
    with pytest.raises(RuntimeError, match="no device in this test"):
        native.fusion_backend("cuda")


def test_cuda_backend_with_device_runs_fusion_on_cpp_and_says_so_once(ext, monkeypatch, caplog, spy_reference):
    monkeypatch.setattr(native, "HAS_CUDA", True)
    monkeypatch.setattr(native, "cuda_device_status", lambda: (True, ""))
    monkeypatch.setenv(ENV, "cuda")
    native._log_no_cuda_twin.cache_clear()
    with caplog.at_level(logging.INFO, logger=native.__name__):
        assert native.fusion_backend() == "cpp"
        native.fuse(*ARGS)
        native.fuse(*ARGS)
    assert spy_reference == []
    notes = [r for r in caplog.records if "no CUDA implementation" in r.getMessage()]
    assert len(notes) == 1 and "fusion" in notes[0].getMessage()


def test_cpp_without_extension_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(native, "HAS_NATIVE", False)
    monkeypatch.setattr(native, "NATIVE_IMPORT_ERROR", "ImportError: test")
    monkeypatch.setenv(ENV, "cpp")
    with pytest.raises(RuntimeError, match=r"pip install \.") as raised:
        native.fusion_backend()
    assert "C++17" in str(raised.value) and "CMake" in str(raised.value)
    monkeypatch.setenv(ENV, "auto")
    assert native.fusion_backend() == "numpy"


@pytest.mark.parametrize("value", ["gpu", "c++", "torch", "1"])
def test_unknown_env_value_is_a_value_error(value, monkeypatch):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=ENV):
        native.fusion_backend()
    with pytest.raises(ValueError, match=ENV):
        native.fuse(*ARGS)


def test_unknown_backend_argument_is_a_value_error(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match="backend"):
        native.fuse(*ARGS, backend="gpu")


def test_numpy_fallback_when_the_extension_does_not_import(tmp_path):
    """A fresh interpreter where `import rag_service._native` fails: the facade logs why and serves NumPy."""
    script = textwrap.dedent("""
        import logging, os, sys
        sys.modules["rag_service._native"] = None  # makes the import raise ImportError
        logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(name)s %(message)s")
        import numpy as np
        from rag_service.kernels import native
        assert native.HAS_NATIVE is False and native.HAS_CUDA is False, native.HAS_NATIVE
        assert native.NATIVE_IMPORT_ERROR
        assert native.fusion_backend() == "numpy"
        got = native.fuse([1, 2, 3], [3.0, 2.0, 1.0], [3, 5], [0.9, 0.1], method="weighted", top_k=10)
        assert got.ids.tolist() == [1, 3, 2, 5], got
        info = native.backend_info()
        assert info["fusion_backend"] == "numpy" and info["cuda_device_available"] is False and info["cuda_reason"]
        for backend in ("cpp", "cuda"):
            os.environ["RAG_SERVICE_BACKEND"] = backend
            try:
                native.fusion_backend()
            except RuntimeError as error:
                assert "pip install ." in str(error), error
            else:
                raise AssertionError(backend + " did not raise")
        print("FALLBACK OK")
    """)
    root = Path(native.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(ENV, None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FALLBACK OK" in done.stdout
    assert "LOG rag_service.kernels.native rag_service._native is not available" in done.stdout
    assert "pip install ." in done.stdout
