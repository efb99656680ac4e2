"""The generated gRPC stubs (scripts/gen_protos.py, run by the build) import under the grpcio installed beside them."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import grpc

from rag_service.pb.rag.v1 import retrieval_pb2_grpc, shard_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def test_the_stubs_ask_for_the_minor_release_of_the_tools_that_wrote_them():
    for module in (retrieval_pb2_grpc, shard_pb2_grpc):
        assert re.fullmatch(r"\d+\.\d+\.0", module.GRPC_GENERATED_VERSION)
        assert _version(grpc.__version__) >= _version(module.GRPC_GENERATED_VERSION)


def test_the_generator_keeps_the_minor_release_and_nothing_else():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = "import grpc\n\nGRPC_GENERATED_VERSION = '1.85.4'\nGRPC_VERSION = grpc.__version__\nx = '1.85.4'\n"
    assert gen.minor_release(text) == text.replace("GRPC_GENERATED_VERSION = '1.85.4'",
                                                   "GRPC_GENERATED_VERSION = '1.85.0'")
    assert gen.minor_release("GRPC_GENERATED_VERSION = '2.0.0'\n") == "GRPC_GENERATED_VERSION = '2.0.0'\n"
