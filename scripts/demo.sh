#!/usr/bin/env bash
# Sets up, builds two indexes of the bundled demo corpus (the Python standard library's docstrings: all of it, and
# the data-format modules alone), serves both as collections of one server on $PORT (default 50051) and answers
# queries over gRPC. The server then keeps running until Ctrl-C, unless RAG_DEMO_ONESHOT=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1
PORT=${PORT:-50051}
QUERY=${QUERY:-how do I read a CSV file into dictionaries}

python -I -m rag_service.demo --output indexes/demo-corpus.jsonl
python -I -m rag_service.demo --output indexes/demo-data-corpus.jsonl --modules data
rag-index build --input indexes/demo-corpus.jsonl --output indexes/demo --name demo
rag-index build --input indexes/demo-data-corpus.jsonl --output indexes/demo-data --name demo-data

# Two collections: "demo" (a plain --index: the default one) and "demo-data".
rag-serve --index indexes/demo --index demo-data=indexes/demo-data --port "$PORT" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' EXIT INT TERM

python -I - "$PORT" "$QUERY" <<'PY'
import sys
from rag_service.client import RetrieverClient

port, query = sys.argv[1], sys.argv[2]
with RetrieverClient(f"localhost:{port}", timeout=10) as client:
    client.wait_until_serving(timeout=300)
    info = client.index_info()
    print(f"\nindex {info.name} {info.version}: {info.document_count} documents, {info.chunk_count} chunks")
    result = client.search(query, top_k=5)
    print(f"query: {query!r} -> {len(result.contexts)} contexts in {result.server_time_us / 1000:.1f} ms (server)")
    for rank, ctx in enumerate(result.contexts, 1):
        snippet = " ".join(ctx.text.split())[:80]
        print(f"{rank}. {ctx.score:.3f}  {ctx.chunk_id:<28} {snippet}")
    filtered = client.search("parse a date string", top_k=3, filters={"module": "datetime"})
    print("\nwith filters={'module': 'datetime'}: " + ", ".join(c.doc_id for c in filtered.contexts))
    collections, _ = client.list_collections()
    print("\ncollections: " + ", ".join(f"{c.name} ({c.document_count} documents{', default' if c.is_default else ''})"
                                       for c in collections))
    other = client.search(query, top_k=3, collection="demo-data")
    print(f"collection={other.collection!r}: " + ", ".join(c.chunk_id for c in other.contexts))
PY

if [ "${RAG_DEMO_ONESHOT:-0}" = "1" ]; then
  exit 0
fi
echo "rag-serve is serving collections demo and demo-data on localhost:$PORT (Ctrl-C stops it)"
wait $server
