#!/usr/bin/env bash
# Rolling switch of every rag-serve pod to the index version that CURRENT names now (after index-build-job.yaml, or
# `rag-index add/delete`, published it), one pod at a time: each pod loads, checks and warms the new version beside
# the old one and swaps it in (ReloadIndex), so no request fails and every reply names the version that produced
# it. A pod whose reload fails keeps serving the old version, and the script stops there with the pod's error.
#
#   NAMESPACE=search deploy/rolling-reload.sh
#
# Needs kubectl access to `exec` into the pods; the admin token comes from the pod's own RAG_AUTH__ADMIN_TOKEN_FILE.
set -euo pipefail
NAMESPACE=${NAMESPACE:-default}
SELECTOR=${SELECTOR:-app.kubernetes.io/name=rag-serve}
PORT=${PORT:-50051}
PAUSE=${PAUSE:-2}  # seconds between pods: let each warm its caches before the next one reloads

# Runs inside the pod: ReloadIndex("") re-reads the configured index, CURRENT followed anew; prints old -> new.
read -r -d '' RELOAD <<PY || true
import os, sys
from pathlib import Path
from rag_service.client import RetrieverClient, RetrieverError
token = os.environ.get("RAG_AUTH__ADMIN_TOKEN") or Path(os.environ["RAG_AUTH__ADMIN_TOKEN_FILE"]).read_text().strip()
with RetrieverClient("127.0.0.1:${PORT}", admin_token=token) as client:
    try:
        reply = client.reload("", timeout=600)
    except RetrieverError as error:
        sys.exit(f"reload failed, still serving the previous version: {error}")
print(f"{reply.previous_version} -> {reply.version} ({reply.load_seconds:.1f} s)")
PY

pods=$(kubectl -n "$NAMESPACE" get pods -l "$SELECTOR" --field-selector=status.phase=Running -o name)
[ -n "$pods" ] || { echo "no running pods match $SELECTOR in namespace $NAMESPACE" >&2; exit 1; }
for pod in $pods; do
    echo -n "$pod: "
    kubectl -n "$NAMESPACE" exec "$pod" -- python -c "$RELOAD"
    sleep "$PAUSE"
done
