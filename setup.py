"""Build glue: compiles rag_service._native with CMake and generates gRPC code from protos/.

Environment switches:
  RAG_SERVICE_CUDA=OFF|ON|AUTO   (default AUTO: CUDA sources are compiled when nvcc is found)
  RAG_CUDA_ARCHITECTURES="80;90" (CMAKE_CUDA_ARCHITECTURES for the CUDA sources)
  RAG_BUILD_TYPE=Release         (CMake build type)
"""

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def _drop_stale_cmake_cache(build_temp: Path) -> None:
    """Removes a CMake cache whose recorded tools are gone (an earlier pip build environment), so CMake reconfigures
    instead of failing; the object files stay and are reused."""
    cache = build_temp / "CMakeCache.txt"
    if not cache.exists():
        return
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(("CMAKE_MAKE_PROGRAM:", "CMAKE_COMMAND:")):
            tool = line.split("=", 1)[-1].strip()
            if tool and not Path(tool).exists():
                cache.unlink()
                shutil.rmtree(build_temp / "CMakeFiles", ignore_errors=True)
                return


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        cuda = os.environ.get("RAG_SERVICE_CUDA", "AUTO").upper()
        nvcc = _find_nvcc() if cuda != "OFF" else None
        if cuda == "ON" and nvcc is None:
            raise RuntimeError("RAG_SERVICE_CUDA=ON but nvcc was not found (set CUDACXX or put nvcc on PATH)")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('RAG_BUILD_TYPE', 'Release')}",
            f"-DRAG_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ.get('RAG_CUDA_ARCHITECTURES', '80;90')}")
        ninja = shutil.which("ninja")
        if ninja:
            # pip builds in a throw-away environment: name this build's ninja, or a CMake cache left by an earlier
            # `pip install .` in this clone points at one that no longer exists.
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _drop_stale_cmake_cache(build_temp)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)], cwd=build_temp, check=True)


def generate_protos() -> None:
    # Before setup(): the generated packages must exist when setuptools lists them (egg_info, build_py).
    generator = runpy.run_path(str(ROOT / "scripts" / "gen_protos.py"))
    if generator["main"]() != 0:
        raise RuntimeError("generating gRPC code from protos/ failed")


generate_protos()
setup(
    packages=["rag_service", "rag_service.pb", "rag_service.pb.rag", "rag_service.pb.rag.v1",
              "rag_service.index", "rag_service.cli", "rag_service.bench", "rag_service.shard",
              "rag_service.core", "rag_service.kernels", "rag_service.encoder", "rag_service.retrievers",
              "rag_service.search", "rag_service.api"],
    ext_modules=[CMakeExtension("rag_service._native")],
    cmdclass={"build_ext": CMakeBuild},
    package_data={"rag_service.pb.rag.v1": ["*.pyi"], "rag_service": ["py.typed", "_native.pyi"],
                  "rag_service.search": ["rerank_model.json"]},
)
