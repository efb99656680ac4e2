"""The bundled demo corpus: the Python standard library's own docstrings, present on any machine with Python.

`python -m rag_service.demo --output corpus.jsonl` writes a BEIR-style corpus: one document per public module, class
and function docstring, titled by qualified name, with metadata {"module", "kind"} to filter on.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

MODULES = (
    "argparse", "asyncio", "base64", "bisect", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "enum", "fnmatch", "functools", "glob", "gzip", "hashlib", "heapq", "http.client", "io",
    "itertools", "json", "logging", "math", "os", "pathlib", "pickle", "queue", "random", "re", "shutil", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time",
    "typing", "unittest", "urllib.parse", "uuid", "zipfile",
)
# A second, smaller corpus for the demo's second collection: the modules that read and write data formats.
DATA_MODULES = ("base64", "csv", "gzip", "hashlib", "json", "pickle", "sqlite3", "struct", "tarfile", "zipfile")
MIN_DOC_CHARS = 80  # shorter docstrings ("Return self.") carry nothing to retrieve


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _documents(module_name: str) -> Iterator[dict]:
    module = importlib.import_module(module_name)
    doc = inspect.getdoc(module)
    if doc and len(doc) >= MIN_DOC_CHARS:
        yield {"_id": module_name, "title": f"{module_name} module", "text": doc,
               "metadata": {"module": module_name, "kind": "module"}}
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) not in (module_name, module_name.split(".")[0]):
            continue
        kinds: list[tuple[str, Callable[[object], bool]]] = [("class", inspect.isclass),
                                                              ("function", inspect.isroutine)]
        kind = next((k for k, test in kinds if test(obj)), None)
        doc = inspect.getdoc(obj)
        if kind is None or not doc or len(doc) < MIN_DOC_CHARS:
            continue
        qualified = f"{module_name}.{name}"
        yield {"_id": qualified, "title": qualified, "text": f"{name}{_signature(obj)}\n\n{doc}",
               "metadata": {"module": module_name, "kind": kind}}
        if kind == "class":
            for meth_name, meth in sorted(vars(obj).items()):
                meth_doc = inspect.getdoc(meth) if not meth_name.startswith("_") and callable(meth) else None
                if meth_doc and len(meth_doc) >= MIN_DOC_CHARS:
                    yield {"_id": f"{qualified}.{meth_name}", "title": f"{qualified}.{meth_name}",
                           "text": f"{meth_name}{_signature(meth)}\n\n{meth_doc}",
                           "metadata": {"module": module_name, "kind": "method"}}


def write_demo_corpus(output: Path, modules: tuple[str, ...] = MODULES) -> int:
    """Writes the corpus; returns the number of documents."""
    seen: set[str] = set()
    count = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), open(output, "w", encoding="utf-8") as f:
        warnings.simplefilter("ignore")  # some modules warn about deprecated members on access
        for module_name in modules:
            for doc in _documents(module_name):
                if doc["_id"] not in seen:
                    seen.add(doc["_id"])
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
                    count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--modules", choices=("all", "data"), default="all",
                        help="all: the whole demo corpus; data: only the data-format modules (%(choices)s)")
    args = parser.parse_args()
    modules = DATA_MODULES if args.modules == "data" else MODULES
    print(f"wrote {write_demo_corpus(args.output, modules)} documents to {args.output}")


if __name__ == "__main__":
    main()
