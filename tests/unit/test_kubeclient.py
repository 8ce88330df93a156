"""noded's API client against the test API server (real HTTPS, bearer tokens and client certificates): each
kubeconfig form an operator meets, the service account's rotating token, exec credential plugins, and a
kubeconfig that cannot work refused with a message naming what is wrong."""

from __future__ import annotations

import base64
import json
import os
import ssl
import stat

import pytest
import urllib3
import yaml

from noded.sources import kubeclient
from noded.sources.kubeclient import ApiError, ConfigError, from_kubeconfig, from_service_account
from tests.fakeapi import FakeApiServer, client_cert, serving_cert
from tests.objects import service

SERVICES = "/api/v1/services"


@pytest.fixture
def https(tmp_path):
    """A test API server over HTTPS that wants the bearer token "t0k3n"; its CA file."""
    ca, cert, key = serving_cert(tmp_path)
    api = FakeApiServer(tls=(cert, key), token="t0k3n")
    api.start()
    api.put(service("web"))
    yield api, ca
    api.stop()


def kubeconfig(tmp_path, server: str, cluster: dict | None = None, user: dict | None = None) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": server, **(cluster or {})}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": user or {}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def names(client: kubeclient.ApiClient) -> list[str]:
    return [o["metadata"]["name"] for o in json.loads(client.get(SERVICES, {"limit": "10"}, 5).data)["items"]]


def b64(path: str) -> str:
    return base64.b64encode(open(path, "rb").read()).decode()


def test_token_and_a_ca_file_relative_to_the_kubeconfig(https, tmp_path):
    api, ca = https
    os.rename(ca, tmp_path / "cluster-ca.crt")
    path = kubeconfig(tmp_path, api.url, {"certificate-authority": "cluster-ca.crt"}, {"token": "t0k3n"})
    assert names(from_kubeconfig(path)) == ["web"]
    wrong = kubeconfig(tmp_path, api.url, {"certificate-authority": "cluster-ca.crt"}, {"token": "nope"})
    with pytest.raises(ApiError) as refused:
        names(from_kubeconfig(wrong))
    assert refused.value.status == 401 and "401" in str(refused.value)


def test_the_server_is_verified(https, tmp_path):
    api, _ca = https
    (tmp_path / "other").mkdir()
    other_ca, _, _ = serving_cert(tmp_path / "other")  # another CA's
    path = kubeconfig(tmp_path, api.url, {"certificate-authority": other_ca}, {"token": "t0k3n"})
    with pytest.raises(urllib3.exceptions.SSLError):
        names(from_kubeconfig(path))
    # insecure-skip-tls-verify, as kubectl: no check at all
    insecure = kubeconfig(tmp_path, api.url, {"insecure-skip-tls-verify": True}, {"token": "t0k3n"})
    assert names(from_kubeconfig(insecure)) == ["web"]


def test_client_certificate_inline_as_k3s_writes_it_and_as_files(tmp_path):
    """k3s.yaml: certificate-authority-data, client-certificate-data, client-key-data; kubeadm's user
    kubeconfig the same; the kubelet's: files. The test API server requires a client certificate."""
    ca, cert, key = serving_cert(tmp_path)
    client_ca, user_cert, user_key = client_cert(tmp_path)
    api = FakeApiServer(tls=(cert, key), client_ca=client_ca)
    api.start()
    try:
        api.put(service("web"))
        inline = {"client-certificate-data": b64(user_cert), "client-key-data": b64(user_key)}
        path = kubeconfig(tmp_path, api.url, {"certificate-authority-data": b64(ca)}, inline)
        assert names(from_kubeconfig(path)) == ["web"]
        assert not [f for f in os.listdir("/tmp") if f.startswith("noded-client-")]  # the scratch file is gone
        files = {"client-certificate": user_cert, "client-key": user_key}
        assert names(from_kubeconfig(kubeconfig(tmp_path, api.url, {"certificate-authority": ca}, files))) == ["web"]
        without = kubeconfig(tmp_path, api.url, {"certificate-authority": ca}, {})
        with pytest.raises((urllib3.exceptions.SSLError, urllib3.exceptions.ProtocolError, ssl.SSLError)):
            names(from_kubeconfig(without))
    finally:
        api.stop()


def test_exec_plugin_token_run_once_then_again_after_a_401(https, tmp_path):
    """client-go's credential plugin protocol: the command gets KUBERNETES_EXEC_INFO and the kubeconfig's env,
    and prints an ExecCredential; its token is kept, and the plugin run again after a 401."""
    api, ca = https
    runs = tmp_path / "runs"
    plugin = tmp_path / "get-token"
    plugin.write_text(
        "#!/bin/sh\n"
        f'echo "$KUBERNETES_EXEC_INFO" >> {runs}\n'
        'printf \'{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential",'
        '"status":{"token":"%s"}}\' "$(cat "$TOKEN_FROM")"\n'
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "token").write_text("t0k3n")
    spec = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": "./get-token",  # relative to the kubeconfig
        "env": [{"name": "TOKEN_FROM", "value": str(tmp_path / "token")}],
    }
    client = from_kubeconfig(kubeconfig(tmp_path, api.url, {"certificate-authority": ca}, {"exec": spec}))
    assert names(client) == ["web"] and names(client) == ["web"]
    assert len(runs.read_text().splitlines()) == 1
    assert json.loads(runs.read_text().splitlines()[0])["kind"] == "ExecCredential"
    api.token = "rotated"
    (tmp_path / "token").write_text("rotated")
    with pytest.raises(ApiError):  # the kept token is refused once...
        names(client)
    assert names(client) == ["web"]  # ...and the plugin asked again
    assert len(runs.read_text().splitlines()) == 2


def test_exec_plugin_token_renewed_when_it_expires(https, tmp_path):
    api, ca = https
    runs = tmp_path / "runs"
    plugin = tmp_path / "get-token"
    plugin.write_text(
        f"#!/bin/sh\necho run >> {runs}\n"
        'echo \'{"kind":"ExecCredential","status":{"token":"t0k3n","expirationTimestamp":"2020-01-01T00:00:00Z"}}\'\n'
    )
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    client = from_kubeconfig(
        kubeconfig(tmp_path, api.url, {"certificate-authority": ca}, {"exec": {"command": str(plugin)}})
    )
    names(client)
    names(client)
    assert len(runs.read_text().splitlines()) == 2  # expired already: asked each time


def test_in_cluster_token_file_read_again_as_it_rotates(https, tmp_path, monkeypatch):
    api, ca = https
    secrets = tmp_path / "sa"
    secrets.mkdir()
    (secrets / "ca.crt").write_bytes(open(ca, "rb").read())  # noqa: SIM115
    (secrets / "token").write_text("t0k3n\n")
    client = from_service_account(api.url, str(secrets))
    assert names(client) == ["web"]
    api.token = "next"
    (secrets / "token").write_text("next")
    monkeypatch.setattr(kubeclient, "TOKEN_FILE_REREAD", 0.0)
    assert names(client) == ["web"]
    # the address from the environment, as a pod has it
    host, port = api.url.removeprefix("https://").split(":")
    env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
    assert names(from_service_account("", str(secrets), env)) == ["web"]


@pytest.mark.parametrize(
    ("cluster", "user", "message"),
    [
        ({}, {"auth-provider": {"name": "oidc"}}, "auth-provider 'oidc' is not supported"),
        ({"certificate-authority-data": "not base64!"}, {}, "certificate-authority-data is not base64"),
        ({"certificate-authority": "/nonexistent/ca.crt"}, {}, "TLS"),
        ({}, {"client-certificate-data": base64.b64encode(b"x").decode()}, "both its certificate and its key"),
        ({}, {"exec": {"args": ["x"]}}, "exec: no command"),
        ({"certificate-authority": "ca.crt", "certificate-authority-data": "Zm9v"}, {}, "are both given"),
        ({}, {"client-key": "k", "client-key-data": "Zm9v"}, "client-key and client-key-data are both given"),
        ({}, {"token": "t", "username": "u", "password": "p"}, "more than one authentication method"),
    ],
)
def test_a_kubeconfig_that_cannot_work_is_refused_saying_why(tmp_path, cluster, user, message):
    with pytest.raises(ConfigError, match=message):
        from_kubeconfig(kubeconfig(tmp_path, "https://127.0.0.1:6443", cluster, user))


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(ConfigError, match="no context named 'missing'"):
        path = tmp_path / "k"
        path.write_text(yaml.safe_dump({"current-context": "missing", "contexts": []}))
        from_kubeconfig(str(path))
    with pytest.raises(ConfigError, match="is not http"):
        from_kubeconfig(kubeconfig(tmp_path, "127.0.0.1:6443"))
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        from_service_account("", str(tmp_path), {})
    with pytest.raises(ConfigError, match="token file"):
        from_service_account("https://127.0.0.1:6443", str(tmp_path / "none"), {})


def test_an_exec_plugin_that_fails_is_named(https, tmp_path):
    api, ca = https
    plugin = tmp_path / "broken"
    plugin.write_text("#!/bin/sh\necho 'no credentials for you' >&2\nexit 3\n")
    plugin.chmod(plugin.stat().st_mode | stat.S_IXUSR)
    client = from_kubeconfig(
        kubeconfig(tmp_path, api.url, {"certificate-authority": ca}, {"exec": {"command": str(plugin)}})
    )
    with pytest.raises(ConfigError, match="exited 3: no credentials for you"):
        names(client)
