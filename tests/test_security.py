"""Security: bearer tokens on admin and read RPCs, TLS and mutual TLS, ReloadIndex paths confined to the index root.

Real servers on port 0 over real channels; certificates are made by the test (trustme)."""

from __future__ import annotations

import shutil

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from rag_service.client import RetrieverClient, RetrieverError
from rag_service.core.config import ServerConfig, load_config
from rag_service.index.load import resolve_version_dir
from rag_service.pb.rag.v1 import retrieval_pb2 as pb
from rag_service.pb.rag.v1 import retrieval_pb2_grpc as pb_grpc

ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"


@pytest.fixture(scope="module")
def index_root(built_index, tmp_path_factory):
    """A private index root (copied from the shared test index) so tests can add links and versions to it."""
    root = tmp_path_factory.mktemp("secure") / "idx"
    shutil.copytree(built_index, root, symlinks=True)
    return root


@pytest.fixture(scope="module")
def secured(index_root, encoder, server_thread):
    config = ServerConfig(index=index_root, port=0, warmup_queries=0,
                          auth={"admin_token": ADMIN, "search_token": READER})
    with server_thread(config, encoder) as running, grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield running, pb_grpc.RetrieverStub(channel), channel


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize("metadata, code", [
    ((), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", f"Basic {READER}"),), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED),
    (bearer("reader-token-0123456789abcdeX"), grpc.StatusCode.PERMISSION_DENIED),
    (bearer(READER[:-1]), grpc.StatusCode.PERMISSION_DENIED),
    (bearer(ADMIN), grpc.StatusCode.PERMISSION_DENIED),  # the admin token is not a read token
    (bearer(READER), grpc.StatusCode.OK),
    ((("authorization", f"bearer  {READER} "),), grpc.StatusCode.OK),
])
def test_search_token(secured, metadata, code):
    _, stub, _ = secured
    assert _code(stub.Search, pb.SearchRequest(query="volcano lava"), metadata=metadata, timeout=30) == code
    assert _code(stub.GetIndexInfo, pb.GetIndexInfoRequest(), metadata=metadata, timeout=30) == code


def test_admin_rpc_needs_the_admin_token(secured):
    running, stub, _ = secured
    request = pb.ReloadIndexRequest()
    assert _code(stub.ReloadIndex, request, timeout=60) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(stub.ReloadIndex, request, metadata=bearer(READER), timeout=60) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(stub.ReloadIndex, request, metadata=bearer(ADMIN + "x"), timeout=60) == \
        grpc.StatusCode.PERMISSION_DENIED
    reply = stub.ReloadIndex(request, metadata=bearer(ADMIN), timeout=120)
    assert reply.version == reply.previous_version and reply.load_seconds > 0
    refused = running.server.metrics.registry.get_sample_value(
        "rag_requests_total", {"method": "ReloadIndex", "code": "PERMISSION_DENIED"})
    assert refused >= 2


def test_health_and_reflection_need_no_token(secured):
    _, _, channel = secured
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_client_sends_tokens(secured):
    running, _, _ = secured
    with RetrieverClient(f"127.0.0.1:{running.port}", timeout=30, token=READER, admin_token=ADMIN) as client:
        assert client.search("glacier ice").contexts
        assert client.reload().version
    with RetrieverClient(f"127.0.0.1:{running.port}", timeout=30) as client, pytest.raises(RetrieverError) as info:
        client.search("glacier ice")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in info.value.details


def test_without_an_admin_token_admin_rpcs_are_refused(served_index):
    with grpc.insecure_channel(f"127.0.0.1:{served_index.port}") as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.RetrieverStub(channel).ReloadIndex(pb.ReloadIndexRequest(), metadata=bearer("anything"),
                                                   timeout=30)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no admin token" in info.value.details() and "RAG_AUTH__ADMIN_TOKEN" in info.value.details()


def test_tokens_come_from_the_environment_or_a_file(tmp_path, monkeypatch):
    from rag_service.api.auth import load_token

    monkeypatch.setenv("RAG_AUTH__ADMIN_TOKEN", "from-env")
    config = load_config(index=tmp_path)
    assert load_token(config.auth.admin_token, config.auth.admin_token_file, "admin_token") == b"from-env"
    assert "from-env" not in repr(config)  # a secret: kept out of logs and reprs
    monkeypatch.delenv("RAG_AUTH__ADMIN_TOKEN")
    (tmp_path / "token").write_text("from-file\n")
    monkeypatch.setenv("RAG_AUTH__ADMIN_TOKEN_FILE", str(tmp_path / "token"))
    config = load_config(index=tmp_path)
    assert load_token(config.auth.admin_token, config.auth.admin_token_file, "admin_token") == b"from-file"
    with pytest.raises(ValueError, match="not both"):
        load_token(SecretStr("x"), config.auth.admin_token_file, "admin_token")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_token(None, tmp_path / "empty", "admin_token")
    with pytest.raises(ValueError, match="cannot read"):
        load_token(None, tmp_path / "missing", "admin_token")


def test_rag_serve_has_no_token_option():
    from click.testing import CliRunner

    from rag_service.cli.serve import main

    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "--metrics-port" in help_text and "token" not in help_text.split("Options:")[1].split("RAG_")[0].lower()


# Index paths over RPC ---------------------------------------------------------------------------------------------


def test_reload_paths_are_confined_to_the_index_root(secured, index_root, tmp_path):
    _, stub, _ = secured
    version = resolve_version_dir(index_root).name
    outside = tmp_path / "outside"
    shutil.copytree(index_root / version, outside)
    (index_root / "escape").symlink_to(outside, target_is_directory=True)
    (index_root / "inside-link").symlink_to(version, target_is_directory=True)

    def reload(path: str) -> grpc.RpcError | pb.ReloadIndexResponse:
        try:
            return stub.ReloadIndex(pb.ReloadIndexRequest(path=path), metadata=bearer(ADMIN), timeout=120)
        except grpc.RpcError as error:
            return error

    for path in ("../outside", f"{version}/../../outside", str(outside), "escape", "/etc", "inside-link/../..",
                 "a\0b"):
        error = reload(path)
        assert isinstance(error, grpc.RpcError), path
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error.details())
        assert error.details().startswith("path:"), error.details()
    too_long = reload("x" * 5000)  # a name the file system refuses (found by the fuzz test's long mode)
    assert too_long.code() == grpc.StatusCode.FAILED_PRECONDITION and "too long" in too_long.details()
    missing = reload("v-does-not-exist")
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not exist" in missing.details()
    for path in (version, str(index_root / version), "inside-link", ""):
        assert isinstance(reload(path), pb.ReloadIndexResponse), path
    assert stub.Search(pb.SearchRequest(query="coffee beans"), metadata=bearer(READER), timeout=30).contexts


# TLS --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@example.com")
    stranger = other_ca.issue_cert("stranger@example.com")
    files = {}
    for name, blob in [("ca", ca.cert_pem), ("server.crt", server_cert.cert_chain_pems[0]),
                       ("server.key", server_cert.private_key_pem)]:
        files[name] = directory / name
        blob.write_to_path(str(files[name]))
    return {"files": files, "ca": ca.cert_pem.bytes(),
            "client": (client_cert.cert_chain_pems[0].bytes(), client_cert.private_key_pem.bytes()),
            "stranger": (stranger.cert_chain_pems[0].bytes(), stranger.private_key_pem.bytes())}


def _search_code(port: int, **tls) -> grpc.StatusCode:
    with RetrieverClient(f"127.0.0.1:{port}", timeout=10, **tls) as client:
        try:
            client.search("speed of light")
        except RetrieverError as error:
            return error.code
    return grpc.StatusCode.OK


def test_tls(built_index, encoder, server_thread, pki):
    files = pki["files"]
    config = ServerConfig(index=built_index, port=0, warmup_queries=0,
                          tls={"cert_file": files["server.crt"], "key_file": files["server.key"]})
    with server_thread(config, encoder) as running:
        assert _search_code(running.port, tls_ca=pki["ca"]) == grpc.StatusCode.OK
        assert _search_code(running.port, tls_ca=files["ca"]) == grpc.StatusCode.OK
        assert _search_code(running.port) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        wrong_ca = trustme.CA().cert_pem.bytes()
        assert _search_code(running.port, tls_ca=wrong_ca) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(built_index, encoder, server_thread, pki):
    files = pki["files"]
    config = ServerConfig(index=built_index, port=0, warmup_queries=0,
                          tls={"cert_file": files["server.crt"], "key_file": files["server.key"],
                               "client_ca_file": files["ca"]})
    with server_thread(config, encoder) as running:
        cert, key = pki["client"]
        assert _search_code(running.port, tls_ca=pki["ca"], tls_cert=cert, tls_key=key) == grpc.StatusCode.OK
        assert _search_code(running.port, tls_ca=pki["ca"]) == grpc.StatusCode.UNAVAILABLE
        cert, key = pki["stranger"]
        assert _search_code(running.port, tls_ca=pki["ca"], tls_cert=cert, tls_key=key) == \
            grpc.StatusCode.UNAVAILABLE


def test_tls_config_is_checked(tmp_path):
    with pytest.raises(ValueError, match="together"):
        ServerConfig(index=tmp_path, tls={"cert_file": tmp_path / "c"})
    with pytest.raises(ValueError, match="mutual TLS"):
        ServerConfig(index=tmp_path, tls={"client_ca_file": tmp_path / "ca"})
