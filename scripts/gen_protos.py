"""Generate rag_service/pb from protos/ with grpc_tools.protoc (run by the build; run it by hand after editing a proto).

protoc writes absolute imports ("from rag.v1 import ..."); they are rewritten to live under rag_service.pb so the
generated code needs no sys.path tricks. The stubs refuse a grpcio older than the grpcio-tools that wrote them; the
build takes the newest grpcio-tools, which can be a patch release ahead of the grpcio installed beside it (1.85.4
against 1.85.3), and a patch release does not change what the stubs call: they ask for the tools' minor release.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "rag_service" / "pb"


def minor_release(text: str) -> str:
    """Generated code whose grpcio version check asks for the minor release of the tools' version (x.y.0)."""
    return re.sub(r"^(GRPC_GENERATED_VERSION = '\d+\.\d+)\.\d+'", r"\1.0'", text, flags=re.M)


def main() -> int:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    OUT.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}", f"--python_out={OUT}",
                      f"--pyi_out={OUT}", f"--grpc_python_out={OUT}", *protos])
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    packages = {str(Path(p).parent).replace("/", ".") for p in protos}
    for generated in OUT.rglob("*.py*"):
        if generated.suffix not in (".py", ".pyi"):
            continue
        text = generated.read_text()
        for pkg in packages:
            text = re.sub(rf"^from {re.escape(pkg)} import", f"from rag_service.pb.{pkg} import", text, flags=re.M)
        text = minor_release(text)
        generated.write_text(text)
    for directory in {OUT, *(p.parent for p in OUT.rglob("*_pb2.py"))}:
        d = directory
        while d != OUT.parent:
            (d / "__init__.py").touch()
            d = d.parent
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
