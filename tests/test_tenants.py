"""Tenants: tokens scoped to collections and tenants, and collections divided by a tenant key.

Real servers on port 0 over real channels. Two tenants hold passages on the same topics, so every query would find
both; isolation means the other tenant's passages never come back, by Search, StreamSearch, a Prefetch followed by a
cache hit, or a cache entry another tenant filled; and a token scoped to other collections is refused with one
message whether the collection it names exists or not."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

import grpc
import pytest
from click.testing import CliRunner

from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

READER = "reader-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
ACME = "acme-token-0123456789abcdef"
GLOBEX = "globex-token-0123456789abcdef"
ELSEWHERE = "elsewhere-token-0123456789abcdef"
ANY_TENANT = "any-tenant-token-0123456789abcdef"
NAME = "tenantidx"

TOPICS = [
    ("volcano", "Volcanoes", "A volcano erupts when magma rises through the crust and lava, ash and gases escape "
     "through a vent."),
    ("glacier", "Glaciers", "A glacier is a persistent body of dense ice that moves under its own weight and carves "
     "valleys."),
    ("coffee", "Coffee", "Coffee is brewed from roasted beans of the Coffea plant; caffeine makes it a stimulant."),
    ("bridge", "Suspension bridges", "A suspension bridge hangs its deck from cables slung between towers."),
    ("dna", "DNA", "Deoxyribonucleic acid carries genetic instructions as a double helix of paired bases."),
    ("gravity", "Gravity", "Gravity attracts masses to one another; Einstein described it as curved spacetime."),
]
TENANTS = ("acme", "globex")


def tenant_docs() -> list[dict]:
    return [{"_id": f"{tenant}-{key}", "title": f"{title} ({tenant} notes)",
             "text": f"{text} Notes kept by {tenant} about {key}.", "metadata": {"tenant": tenant, "topic": key,
                                                                                   "year": 2000 + i}}
            for tenant in TENANTS for i, (key, title, text) in enumerate(TOPICS)]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def refusal(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def tenants_of(reply: pb.SearchResponse) -> set[str]:
    return {c.doc_id.split("-")[0] for c in reply.contexts}


@pytest.fixture(scope="module")
def tenant_index(tmp_path_factory, encoder, write_corpus):
    from rag_service.index.build import BuildConfig, build_index

    work = tmp_path_factory.mktemp("tenants")
    corpus = write_corpus(work / "corpus.jsonl", tenant_docs())
    root = work / NAME
    build_index(corpus, root, BuildConfig(chunk_tokens=64, chunk_overlap=16, tenant_key="tenant"), encoder=encoder,
                progress=False)
    return root


def auth_settings() -> dict:
    return {"search_token": READER, "admin_token": ADMIN, "scoped_tokens": [
        {"token": ACME, "collections": [NAME], "tenant": "acme"},
        {"token": GLOBEX, "collections": [NAME], "tenant": "globex"},
        {"token": ELSEWHERE, "collections": ["elsewhere"]},
        {"token": ANY_TENANT, "collections": [NAME]},
    ]}


@pytest.fixture(scope="module")
def tenant_server(tenant_index, encoder, server_thread):
    from rag_service.core.config import ServerConfig

    # Prefetch runs whenever fewer than 4 live searches are in flight: always, in the sequential tests; and the
    # concurrent test's 4 callers are never shed for load.
    config = ServerConfig(index=tenant_index, port=0, warmup_queries=0, auth=auth_settings(),
                          cache={"prefetch_busy_in_flight": 4}, max_queued=8)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield running, pb_grpc.RetrieverStub(channel)


@pytest.mark.slow
def test_index_info_reports_the_tenant_key(tenant_server):
    _, stub = tenant_server
    info = stub.GetIndexInfo(pb.GetIndexInfoRequest(), metadata=bearer(ACME), timeout=30)
    assert info.tenant_key == "tenant" and info.name == NAME


@pytest.mark.slow
def test_search_returns_only_the_tokens_tenant(tenant_server):
    _, stub = tenant_server
    for token, tenant in ((ACME, "acme"), (GLOBEX, "globex")):
        reply = stub.Search(pb.SearchRequest(query="volcano magma lava eruption", top_k=12), metadata=bearer(token),
                            timeout=30)
        assert reply.contexts and tenants_of(reply) == {tenant}
        # Naming its own tenant is the same request.
        same = stub.Search(pb.SearchRequest(query="volcano magma lava eruption", top_k=12, tenant=tenant),
                           metadata=bearer(token), timeout=30)
        assert [c.chunk_id for c in same.contexts] == [c.chunk_id for c in reply.contexts]
    code, details = refusal(stub.Search, pb.SearchRequest(query="volcano", tenant="globex"), metadata=bearer(ACME),
                            timeout=30)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "tenant" in details


@pytest.mark.slow
def test_concurrent_calls_keep_their_own_scopes(tenant_server):
    """Each RPC runs with its own token's scope, however the calls of two tenants interleave on the server."""
    from concurrent.futures import ThreadPoolExecutor

    _, stub = tenant_server
    queries = ["volcano magma", "glacier ice", "coffee caffeine", "suspension bridge", "double helix", "gravity"]

    def run(token: str, tenant: str) -> list[set[str]]:
        seen = []
        for i in range(12):
            stream = i % 3 == 2
            request = pb.SearchRequest(query=queries[i % len(queries)], top_k=12, cache=pb.CACHE_BYPASS)
            reply = (next(iter(stub.StreamSearch(iter([pb.QueryDraft(request=request, final=True)]),
                                                 metadata=bearer(token), timeout=60)))
                     if stream else stub.Search(request, metadata=bearer(token), timeout=60))
            seen.append(tenants_of(reply))
        return seen

    with ThreadPoolExecutor(4) as pool:
        futures = {tenant: [pool.submit(run, token, tenant) for _ in range(2)]
                   for token, tenant in ((ACME, "acme"), (GLOBEX, "globex"))}
        for tenant, runs in futures.items():
            for future in runs:
                assert all(seen == {tenant} for seen in future.result())


@pytest.mark.slow
def test_a_filter_cannot_widen_the_tenant(tenant_server):
    _, stub = tenant_server
    widen = pb.Filter(should=[pb.Condition(key="tenant", match=pb.Match(keyword="globex")),
                              pb.Condition(key="tenant", match=pb.Match(keyword="acme"))])
    reply = stub.Search(pb.SearchRequest(query="glacier ice valleys", top_k=12, filter=widen, cache=pb.CACHE_BYPASS),
                        metadata=bearer(ACME), timeout=30)
    assert reply.contexts and tenants_of(reply) == {"acme"}
    other = pb.Filter(must=[pb.Condition(key="tenant", match=pb.Match(keyword="globex"))])
    reply = stub.Search(pb.SearchRequest(query="glacier ice valleys", filter=other, cache=pb.CACHE_BYPASS),
                        metadata=bearer(ACME), timeout=30)
    assert not reply.contexts
    reply = stub.Search(pb.SearchRequest(query="glacier ice valleys", filters={"tenant": "globex"},
                                         cache=pb.CACHE_BYPASS), metadata=bearer(ACME), timeout=30)
    assert not reply.contexts


@pytest.mark.slow
def test_a_tenant_keyed_collection_needs_a_tenant(tenant_server):
    _, stub = tenant_server
    for token in (READER, ANY_TENANT):
        code, details = refusal(stub.Search, pb.SearchRequest(query="coffee beans"), metadata=bearer(token),
                                timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("tenant:")
        # Without a tenant of its own, a token names one.
        reply = stub.Search(pb.SearchRequest(query="coffee beans", tenant="globex"), metadata=bearer(token),
                            timeout=30)
        assert reply.contexts and tenants_of(reply) == {"globex"}
    reply = stub.Search(pb.SearchRequest(query="coffee beans", tenant="initech"), metadata=bearer(READER), timeout=30)
    assert not reply.contexts  # a tenant with no passages has nothing to find


@pytest.mark.slow
def test_stream_search_keeps_the_tenant(tenant_server):
    _, stub = tenant_server

    def drafts(final_tenant: str = ""):
        for text in ("dou", "double hel", "double helix genetic"):
            yield pb.QueryDraft(request=pb.SearchRequest(query=text))
        yield pb.QueryDraft(request=pb.SearchRequest(query="double helix genetic bases", top_k=12,
                                                     tenant=final_tenant), final=True)

    replies = list(stub.StreamSearch(drafts(), metadata=bearer(GLOBEX), timeout=60))
    assert len(replies) == 1 and replies[0].contexts and tenants_of(replies[0]) == {"globex"}
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamSearch(drafts("acme"), metadata=bearer(GLOBEX), timeout=60))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The same words from the other tenant: none of the first tenant's passages (its drafts filled the cache).
    replies = list(stub.StreamSearch(drafts(), metadata=bearer(ACME), timeout=60))
    assert replies[0].contexts and tenants_of(replies[0]) == {"acme"}


@pytest.mark.slow
def test_prefetch_fills_only_the_tenants_cache(tenant_server, wait_for):
    running, stub = tenant_server
    query = "suspension bridge deck cables towers"
    request = pb.SearchRequest(query=query, top_k=12)
    registry = running.server.metrics.registry

    def filled() -> float:
        return registry.get_sample_value("rag_prefetch_completed_total", {"outcome": "filled"}) or 0.0

    before = filled()
    accepted = stub.Prefetch(pb.PrefetchRequest(requests=[request]), metadata=bearer(ACME), timeout=30)
    assert accepted.accepted == 1
    assert wait_for(lambda: filled() == before + 1, timeout=30)
    hit = stub.Search(request, metadata=bearer(ACME), timeout=30)
    assert hit.served_from == pb.SERVED_FROM_PREFETCHED and tenants_of(hit) == {"acme"}
    other = stub.Search(request, metadata=bearer(GLOBEX), timeout=30)
    assert other.served_from == pb.SERVED_FROM_MISS and other.contexts and tenants_of(other) == {"globex"}
    # A request may not prefetch for another tenant either.
    code, _ = refusal(stub.Prefetch, pb.PrefetchRequest(requests=[pb.SearchRequest(query=query, tenant="globex")]),
                      metadata=bearer(ACME), timeout=30)
    assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.slow
def test_tenants_never_share_cache_entries(tenant_server):
    _, stub = tenant_server
    query = "gravity masses spacetime"
    first, again, replayed = (stub.Search(pb.SearchRequest(query=query, top_k=12), metadata=bearer(ACME), timeout=30)
                              for _ in range(3))
    assert first.served_from == pb.SERVED_FROM_MISS and again.served_from == pb.SERVED_FROM_EXACT
    assert replayed.served_from == pb.SERVED_FROM_EXACT and tenants_of(replayed) == {"acme"}
    # The same request bytes under another token: not the first token's replay.
    other = stub.Search(pb.SearchRequest(query=query, top_k=12), metadata=bearer(GLOBEX), timeout=30)
    assert other.served_from == pb.SERVED_FROM_MISS and tenants_of(other) == {"globex"}
    # A near-identical query (a semantic hit's territory) still stays within the tenant.
    near = stub.Search(pb.SearchRequest(query="gravity masses spacetime?", top_k=12), metadata=bearer(GLOBEX),
                       timeout=30)
    assert near.contexts and tenants_of(near) == {"globex"}
    # The search token naming a tenant reads that tenant's entry: the key is the filter, not the token.
    named = stub.Search(pb.SearchRequest(query=query, top_k=12, tenant="acme"), metadata=bearer(READER), timeout=30)
    assert named.served_from == pb.SERVED_FROM_EXACT and tenants_of(named) == {"acme"}


@pytest.mark.slow
def test_a_token_scoped_to_other_collections_is_refused_alike(tenant_server):
    _, stub = tenant_server
    messages = set()
    for collection in ("", NAME, "no-such-collection", "elsewhere-missing"):
        for call, request in (
                (stub.Search, pb.SearchRequest(query="volcano", collection=collection, tenant="acme")),
                (stub.GetIndexInfo, pb.GetIndexInfoRequest(collection=collection)),
                (stub.Prefetch, pb.PrefetchRequest(requests=[pb.SearchRequest(query="volcano", collection=collection,
                                                                              tenant="acme")]))):
            code, details = refusal(call, request, metadata=bearer(ELSEWHERE), timeout=30)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (call, collection)
            messages.add(details)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamSearch(iter([pb.QueryDraft(request=pb.SearchRequest(query="volcano", collection=collection,
                                                                               tenant="acme"), final=True)]),
                                   metadata=bearer(ELSEWHERE), timeout=30))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        messages.add(info.value.details())
    # One message for the collection that exists and the ones that do not, and it names none of them.
    assert len(messages) == 1 and NAME not in messages.pop()


@pytest.mark.slow
def test_a_batch_is_held_to_the_tokens_scope_query_by_query(tenant_server):
    _, stub = tenant_server
    requests = [pb.SearchRequest(query="volcano magma lava eruption", top_k=12),
                pb.SearchRequest(query="glacier ice", tenant="globex"),
                pb.SearchRequest(query="coffee beans", collection="elsewhere")]
    reply = stub.SearchBatch(pb.SearchBatchRequest(requests=requests), metadata=bearer(ACME), timeout=30)
    first, other_tenant, other_collection = reply.results
    assert first.code == 0 and first.response.contexts and tenants_of(first.response) == {"acme"}
    assert other_tenant.code == grpc.StatusCode.PERMISSION_DENIED.value[0] and "tenant" in other_tenant.message
    assert other_collection.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "elsewhere" not in other_collection.message
    # The scope is the one thing the token changes: the same batch under another tenant's token.
    globex = stub.SearchBatch(pb.SearchBatchRequest(requests=requests[:1]), metadata=bearer(GLOBEX), timeout=30)
    assert tenants_of(globex.results[0].response) == {"globex"}


@pytest.mark.slow
def test_tokens_are_still_checked(tenant_server):
    running, stub = tenant_server
    assert refusal(stub.Search, pb.SearchRequest(query="volcano", tenant="acme"), timeout=30)[0] == \
        grpc.StatusCode.UNAUTHENTICATED
    assert refusal(stub.Search, pb.SearchRequest(query="volcano", tenant="acme"), metadata=bearer(ACME + "x"),
                   timeout=30)[0] == grpc.StatusCode.PERMISSION_DENIED
    # Scoped tokens are read tokens: no admin RPC.
    assert refusal(stub.ReloadIndex, pb.ReloadIndexRequest(), metadata=bearer(ACME), timeout=60)[0] == \
        grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.slow
def test_the_shard_service_refuses_scoped_tokens(tenant_server):
    from rag_service.pb.rag.v1 import shard_pb2 as spb
    from rag_service.pb.rag.v1 import shard_pb2_grpc as spb_grpc

    running, _ = tenant_server
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = spb_grpc.ShardStub(channel)
        request = spb.CandidatesRequest(query="volcano", depth=10)
        for token in (ACME, ANY_TENANT):
            assert refusal(stub.Candidates, request, metadata=bearer(token), timeout=30)[0] == \
                grpc.StatusCode.PERMISSION_DENIED
        assert refusal(stub.Candidates, request, metadata=bearer(READER), timeout=30)[0] not in (
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


@pytest.mark.slow
def test_the_typed_client_names_the_tenant(tenant_server):
    from rag_service.client import RetrieverClient, RetrieverError

    running, _ = tenant_server
    with RetrieverClient(f"127.0.0.1:{running.port}", timeout=30, token=READER) as client:
        result = client.search("coffee stimulant caffeine", tenant="acme", top_k=12)
        assert result.contexts and {c.doc_id.split("-")[0] for c in result.contexts} == {"acme"}
        assert client.prefetch(["dna genetic"], tenant="globex").accepted == 1
        streamed = list(client.stream_search([("dna", False), ("dna genetic bases", True)], tenant="globex"))
        assert {c.doc_id.split("-")[0] for c in streamed[0].contexts} == {"globex"}
        with pytest.raises(RetrieverError) as info:
            client.search("coffee")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with RetrieverClient(f"127.0.0.1:{running.port}", timeout=30, token=ACME) as client, \
            pytest.raises(RetrieverError) as info:
        client.search("coffee", tenant="globex")
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.slow
def test_a_tenant_on_a_collection_without_a_tenant_key(served_index):
    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        code, details = refusal(stub.Search, pb.SearchRequest(query="volcano", tenant="acme"), timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("tenant:")
        assert stub.GetIndexInfo(pb.GetIndexInfoRequest(), timeout=30).tenant_key == ""


@pytest.mark.slow
def test_a_tenant_token_reads_a_collection_without_a_tenant_key_it_is_scoped_to(built_index, encoder, server_thread):
    """The token's collections decide what it reads; its tenant applies where a collection is divided by one."""
    from rag_service.core.config import ServerConfig

    auth = {"scoped_tokens": [{"token": ACME, "collections": [built_index.name], "tenant": "acme"}]}
    config = ServerConfig(index=built_index, port=0, warmup_queries=0, auth=auth)
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        assert stub.Search(pb.SearchRequest(query="volcano"), metadata=bearer(ACME), timeout=30).contexts
        # With scoped tokens configured, a read needs a token even without a search token.
        assert refusal(stub.Search, pb.SearchRequest(query="volcano"), timeout=30)[0] == \
            grpc.StatusCode.UNAUTHENTICATED
        # And the Shard service, which would take any filter, takes none of them.
        from rag_service.pb.rag.v1 import shard_pb2 as spb
        from rag_service.pb.rag.v1 import shard_pb2_grpc as spb_grpc

        code, _ = refusal(spb_grpc.ShardStub(channel).GetShardInfo, spb.GetShardInfoRequest(), metadata=bearer(ACME),
                          timeout=30)
        assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.slow
def test_the_shard_router_enforces_the_tenant(tenant_index, encoder, server_thread, tmp_path):
    """A router over two shards of the tenant-keyed index answers a tenant what the single index answers it."""
    from rag_service.core.config import ServerConfig
    from rag_service.shard.split import read_router, split_index

    out = tmp_path / "sharded"
    split_index(tenant_index, out, 2)
    assert read_router(out / "router")["tenant_key"] == "tenant"
    with ExitStack() as stack:
        shards = [stack.enter_context(server_thread(ServerConfig(index=out / f"shard-{i}", port=0, warmup_queries=0),
                                                    encoder)) for i in range(2)]
        router = stack.enter_context(server_thread(ServerConfig(
            index=out / "router", port=0, warmup_queries=0, auth=auth_settings(),
            router={"shards": [f"127.0.0.1:{s.port}" for s in shards]}), encoder))
        single = stack.enter_context(server_thread(ServerConfig(index=tenant_index, port=0, warmup_queries=0),
                                                   encoder))
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{router.port}"))
        single_channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{single.port}"))
        stub, single_stub = pb_grpc.RetrieverStub(channel), pb_grpc.RetrieverStub(single_channel)
        assert stub.GetIndexInfo(pb.GetIndexInfoRequest(), metadata=bearer(ACME), timeout=30).tenant_key == "tenant"
        for query in ("volcano magma", "glacier ice", "coffee beans caffeine"):
            request = pb.SearchRequest(query=query, top_k=12, cache=pb.CACHE_BYPASS)
            routed = stub.Search(request, metadata=bearer(GLOBEX), timeout=30)
            assert routed.contexts and tenants_of(routed) == {"globex"}
            request.tenant = "globex"
            alone = single_stub.Search(request, timeout=30)
            assert [c.chunk_id for c in routed.contexts] == [c.chunk_id for c in alone.contexts]
        code, _ = refusal(stub.Search, pb.SearchRequest(query="volcano"), metadata=bearer(READER), timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT


# -- builds ----------------------------------------------------------------------------------------------------------

def _build(tmp_path, write_corpus, encoder, docs, tenant_key, schema=None):
    from rag_service.index.build import BuildConfig, build_index

    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    config = BuildConfig(chunk_tokens=64, chunk_overlap=16, tenant_key=tenant_key, metadata_schema=schema,
                         export_onnx=False, document_encoder="torch", window_sentences=0)
    return build_index(corpus, tmp_path / "idx", config, encoder=encoder, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("key, schema, message", [
    ("customer", None, "tenant key 'customer' is not a metadata field of the corpus; fields: tenant, topic, year"),
    ("year", None, "tenant key 'year' is a integer field; it must be keyword"),
    ("topic", {"topic": "keyword_list"}, "tenant key 'topic' is a keyword_list field"),
])
def test_a_tenant_key_must_be_a_keyword_field(tmp_path, write_corpus, encoder, key, schema, message):
    from rag_service.core.errors import BuildError

    with pytest.raises(BuildError, match=message.replace("(", r"\(")):
        _build(tmp_path, write_corpus, encoder, tenant_docs(), key, schema)
    assert not (tmp_path / "idx" / "CURRENT").exists()


@pytest.mark.slow
def test_every_document_needs_a_tenant(tmp_path, write_corpus, encoder):
    from rag_service.core.errors import BuildError

    docs = tenant_docs()
    docs[3]["metadata"].pop("tenant")
    with pytest.raises(BuildError, match=f"document '{docs[3]['_id']}': no value for the tenant key 'tenant'"):
        _build(tmp_path, write_corpus, encoder, docs, "tenant")


@pytest.mark.slow
def test_numeric_tenants_are_keyword_by_the_schema(tmp_path, write_corpus, encoder):
    from rag_service.index.load import load_index

    docs = [{**d, "metadata": {**d["metadata"], "tenant": 7 if d["metadata"]["tenant"] == "acme" else 8}}
            for d in tenant_docs()]
    built = _build(tmp_path, write_corpus, encoder, docs, "tenant", {"tenant": "keyword"})
    index = load_index(built)
    assert index.tenant_key == "tenant" and index.store.metadata_schema["tenant"] == "keyword"
    assert json.loads((built / "manifest.json").read_text())["build_config"]["tenant_key"] == "tenant"
    # An update rebuilds with the same key, so it holds the added documents to it too.
    from rag_service.core.errors import BuildError
    from rag_service.index.chunking import Document
    from rag_service.index.update import update_index

    root = built.parent
    with pytest.raises(BuildError, match="document 'new': no value for the tenant key 'tenant'"):
        update_index(root, add=[Document(id="new", title="New", text="A new note.", metadata={"topic": "x"})],
                     encoder=encoder)
    update_index(root, add=[Document(id="new", title="New", text="A new note.", metadata={"tenant": 9})],
                 encoder=encoder)
    updated = load_index(root)
    assert updated.tenant_key == "tenant" and updated.n_docs == len(docs) + 1
    from rag_service.cli.index import cli

    info = CliRunner().invoke(cli, ["info", str(root)])
    assert info.exit_code == 0 and "tenant key tenant" in info.output


def test_the_cli_refuses_a_declared_non_keyword_tenant_key_before_loading_the_model(tmp_path, write_corpus):
    from rag_service.cli.index import cli

    corpus = write_corpus(tmp_path / "corpus.jsonl", tenant_docs())
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"tenant": "integer"}))
    started = time.perf_counter()
    result = CliRunner().invoke(cli, ["build", "--input", str(corpus), "--output", str(tmp_path / "idx"),
                                      "--tenant-key", "tenant", "--metadata-schema", str(schema)])
    assert result.exit_code != 0 and "tenant key 'tenant' is a integer field; it must be keyword" in result.output
    assert time.perf_counter() - started < 5


# -- configuration and the pieces ------------------------------------------------------------------------------------

def test_scoped_tokens_from_the_environment(monkeypatch, tmp_path):
    from rag_service.api import auth
    from rag_service.core.config import load_config, to_toml

    secret = tmp_path / "globex.token"
    secret.write_text(GLOBEX + "\n")
    monkeypatch.setenv("RAG_AUTH__SCOPED_TOKENS", json.dumps([
        {"token": ACME, "collections": ["manuals", "faq"], "tenant": "acme"},
        {"token_file": str(secret), "collections": ["manuals"]}]))
    config = load_config()
    scopes = auth.load_scopes(config.auth)
    assert scopes == [(ACME.encode(), auth.Scope(frozenset({"manuals", "faq"}), "acme")),
                      (GLOBEX.encode(), auth.Scope(frozenset({"manuals"}), None))]
    printed = to_toml(config)
    assert ACME not in printed and 'collections = ["manuals", "faq"]' in printed and 'tenant = "acme"' in printed


@pytest.mark.parametrize("entry, message", [
    ({"collections": ["a"]}, "exactly one of token and token_file"),
    ({"token": ACME, "token_file": "/x", "collections": ["a"]}, "exactly one of token and token_file"),
    ({"token": ACME, "collections": []}, "at least 1 item"),
    ({"token": ACME, "collections": ["a"], "tenants": "acme"}, "Extra inputs are not permitted"),
    ({"token": ACME, "collections": ["a"], "tenant": ""}, "at least 1 character"),
])
def test_scoped_tokens_are_checked(entry, message):
    from pydantic import ValidationError

    from rag_service.core.config import ServerConfig

    with pytest.raises(ValidationError, match=message):
        ServerConfig(auth={"scoped_tokens": [entry]})


def test_a_token_cannot_carry_two_scopes():
    from rag_service.api import auth
    from rag_service.core.config import ServerConfig

    config = ServerConfig(auth={"search_token": READER, "scoped_tokens": [{"token": READER, "collections": ["a"]}]})
    with pytest.raises(ValueError, match=r"auth.scoped_tokens\[0\]: the same token"):
        auth.load_scopes(config.auth)


def test_the_tenant_is_a_filter_condition_and_part_of_the_cache_key():
    from rag_service.api import tenancy
    from rag_service.api.auth import EVERYTHING, Scope
    from rag_service.core import filter as flt
    from rag_service.core.config import Limits
    from rag_service.core.errors import InvalidArgument, PermissionDenied
    from rag_service.core.params import SearchParams
    from rag_service.search.cache import params_key

    own = flt.Tree(path="filter", must=(flt.Condition(path="filter.must[0]", key="year", kind=flt.RANGE,
                                                      bounds=(None, 2001.0, None, None)),))
    plain = SearchParams(query="q", filter=own)
    acme = tenancy.apply(plain, "", Scope(frozenset({"c"}), "acme"), "tenant", Limits())
    globex = tenancy.apply(plain, "globex", EVERYTHING, "tenant", Limits())
    assert acme.filter is not None and acme.filter.must[1] is own
    assert acme.filter.must[0] == flt.Condition(path="tenant", key="tenant", kind=flt.MATCH,
                                                values=(("keyword", "acme"),))
    assert len({params_key(plain), params_key(acme), params_key(globex)}) == 3
    assert tenancy.apply(plain, "", Scope(None, "acme"), None, Limits()) is plain
    scope = Scope(frozenset({"manuals"}), "acme")
    assert scope.allows("manuals") and not scope.allows("faq") and EVERYTHING.allows("faq")
    with pytest.raises(PermissionDenied):
        tenancy.apply(plain, "globex", Scope(None, "acme"), "tenant", Limits())
    for requested, key in (("", "tenant"), ("acme", None), ("x" * 2000, "tenant")):
        with pytest.raises(InvalidArgument) as info:
            tenancy.apply(plain, requested, EVERYTHING, key, Limits())
        assert info.value.field == "tenant"


@pytest.mark.slow
def test_scopes_hold_across_collections_and_listings(tenant_index, built_index, encoder, server_thread):
    from rag_service.core.config import ServerConfig

    config = ServerConfig(collections={NAME: tenant_index, "plain": built_index}, default_collection=NAME, port=0,
                          warmup_queries=0, auth=auth_settings())
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.RetrieverStub(channel)
        listed = stub.ListCollections(pb.ListCollectionsRequest(), metadata=bearer(ACME), timeout=30)
        assert [c.name for c in listed.collections] == [NAME] and listed.collections[0].tenant_key == "tenant"
        everything = stub.ListCollections(pb.ListCollectionsRequest(), metadata=bearer(READER), timeout=30)
        assert sorted(c.name for c in everything.collections) == sorted([NAME, "plain"])
        assert not stub.ListCollections(pb.ListCollectionsRequest(), metadata=bearer(ELSEWHERE),
                                        timeout=30).collections
        # Refused before the name is looked up: the served "plain" and a missing name read the same.
        refusals = {refusal(stub.Search, pb.SearchRequest(query="volcano", collection=name), metadata=bearer(ACME),
                            timeout=30) for name in ("plain", "missing")}
        assert len(refusals) == 1 and refusals.pop()[0] == grpc.StatusCode.PERMISSION_DENIED
        reply = stub.Search(pb.SearchRequest(query="volcano magma", collection=NAME), metadata=bearer(ACME),
                            timeout=30)
        assert reply.collection == NAME and tenants_of(reply) == {"acme"}
        assert stub.Search(pb.SearchRequest(query="volcano magma", collection="plain"), metadata=bearer(READER),
                           timeout=30).collection == "plain"
