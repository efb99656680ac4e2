"""Copies an index version and adds what issue 5 builds (the ONNX encoder export, optional dense codes) without
re-encoding the corpus: benchmarks of the fast path on indexes built before it (or by another helper's build).

    python bench/experiments/add_fastpath.py --index /tmp/idx/scifact --output /tmp/fastpath/scifact [--dense-codes sq8]

The files of the source version are hard-linked (never modified); the new version gets its own manifest with the
added files' checksums and is published under OUTPUT with the usual CURRENT link.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from rag_service.encoder import onnx_export
from rag_service.index import manifest as manifest_mod
from rag_service.index import publish as publish_mod
from rag_service.index.load import resolve_version_dir
from rag_service.retrievers import dense as dense_mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--dense-codes", choices=dense_mod.CODE_KINDS, default="none")
    args = parser.parse_args()

    source = resolve_version_dir(args.index)
    manifest = manifest_mod.read_manifest(source)
    root = args.output.absolute()
    root.mkdir(parents=True, exist_ok=True)
    tmp = publish_mod.make_tmp_dir(root)
    for name in manifest["files"]:
        try:
            os.link(source / name, tmp / name)
        except OSError:
            shutil.copyfile(source / name, tmp / name)
    if not onnx_export.has_export(tmp):  # indexes built today carry their export already
        onnx_export.copy_export(onnx_export.cached_export(), tmp)
    if args.dense_codes != "none":
        import numpy as np

        dense_mod.write_codes(tmp, np.load(tmp / dense_mod.VECTORS_FILE, mmap_mode="r"), args.dense_codes)
    files = manifest_mod.file_entries(tmp)
    created = manifest_mod.utc_now()
    manifest = {**manifest, "files": files, "version": manifest_mod.make_version(created, files),
                "created_at": manifest_mod.iso_utc(created),
                "params": {**manifest["params"], "dense_codes": args.dense_codes},
                "encoder_export": {"files": list(onnx_export.FILES),
                                   **json.loads((tmp / onnx_export.CONFIG_FILE).read_text())}}
    published = publish_mod.publish(root, tmp, manifest, keep=3)
    print(published)


if __name__ == "__main__":
    main()
