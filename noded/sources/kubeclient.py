"""The Kubernetes API client of noded's sources: where the API server is and who noded is (a kubeconfig, or
the pod's service account), and one GET at a time over urllib3, TLS verified.

Not the official `kubernetes` client: importing it cost 16.5 MiB of the daemon's RSS (pydantic, requests,
oauthlib, websocket and its dynamic, stream and watch packages), a tenth of a daemon serving 10,000 services
(bench/control_plane.py, API list), for what noded needs of it: a GET with a bearer token or a client
certificate. It reads of a kubeconfig what client-go reads for that: the current context's cluster (server,
certificate-authority[-data], insecure-skip-tls-verify, tls-server-name, proxy-url) and user (token,
tokenFile, client-certificate[-data], client-key[-data], username/password, and exec credential plugins
giving a token). An auth-provider (gcp and azure are gone from client-go, oidc is deprecated) is refused by
name, as is an exec plugin that answers with a client certificate.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import pathlib
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import urllib3
import yaml

from noded import __version__

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_FILE_REREAD = 60.0  # seconds: a token file is read again this often (client-go's cached file source)
EXEC_TIMEOUT = 30.0  # seconds an exec credential plugin may take
POOL_SIZE = 16  # connections kept per API server: a watch per kind, and a list page ahead
Timeout = float | tuple[float, float] | None
USER_AGENT = f"noded/{__version__}"  # what the API server's audit log names the client


class ConfigError(Exception):
    """The kubeconfig or the service account cannot give a usable client (names what is wrong)."""


class ApiError(Exception):
    """An answer of the API server outside 2xx: its status, reason, headers and body (a Status object)."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        message = ""
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(body).get("message") or "")
        super().__init__(f"({status}) {reason}{': ' + message if message else ''}")


class ApiClient:
    """GETs to one API server, each with the credentials' current headers. Thread-safe (urllib3's pool)."""

    def __init__(
        self,
        server: str,
        ssl_context: ssl.SSLContext | None = None,
        credentials: Credentials | None = None,
        proxy: str | None = None,
        server_hostname: str | None = None,
    ) -> None:
        url = urllib.parse.urlsplit(server)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"server {server!r} is not http(s)://HOST[:PORT]")
        self.server = server.rstrip("/")
        self.credentials = credentials or Credentials()
        pool: dict[str, Any] = {"maxsize": POOL_SIZE, "retries": False}
        if url.scheme == "https":
            pool["ssl_context"] = ssl_context or ssl.create_default_context()
            if server_hostname:
                pool["server_hostname"] = server_hostname
        self.http = urllib3.ProxyManager(proxy, **pool) if proxy else urllib3.PoolManager(**pool)

    def get(self, path: str, query: Mapping[str, str] | None = None, timeout: Timeout = None):
        """The urllib3 response of GET path?query, its body not read (a watch streams); ApiError outside 2xx,
        after which credentials that may have expired are renewed (client-go renews on a 401)."""
        url = self.server + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT, **self.credentials.headers()}
        response = self.http.request(
            "GET", url, headers=headers, preload_content=False, timeout=_timeout(timeout), retries=False
        )
        if not 200 <= response.status <= 299:
            body = response.read()
            response.release_conn()
            if response.status == 401:
                self.credentials.expire()
            raise ApiError(response.status, response.reason or "", dict(response.headers), body)
        return response


def _timeout(timeout: Timeout) -> urllib3.Timeout:
    if isinstance(timeout, tuple):
        return urllib3.Timeout(connect=timeout[0], read=timeout[1])
    return urllib3.Timeout(total=timeout)


class Credentials:
    """Who the requests are from: the Authorization header of a static token, a token file read again each
    TOKEN_FILE_REREAD seconds (a projected service-account token rotates), an exec plugin's token (run again
    when it expires or after a 401), or basic auth; none for a client certificate (in the TLS context)."""

    def __init__(
        self,
        token: str = "",
        token_file: str = "",
        exec_plugin: ExecPlugin | None = None,
        basic: tuple[str, str] | None = None,
    ) -> None:
        self._token, self._token_file, self._exec, self._basic = token, token_file, exec_plugin, basic
        self._lock = threading.Lock()
        self._read_at = float("-inf")

    def headers(self) -> dict[str, str]:
        if self._basic is not None:
            pair = base64.b64encode(f"{self._basic[0]}:{self._basic[1]}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        token = self._current()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _current(self) -> str:
        if self._exec is not None:
            return self._exec.token()
        if self._token_file:
            with self._lock:
                if time.monotonic() - self._read_at >= TOKEN_FILE_REREAD:
                    self._token = _read_token(self._token_file)
                    self._read_at = time.monotonic()
        return self._token

    def expire(self) -> None:
        """A 401: what may be stale is fetched again at the next request."""
        with self._lock:
            self._read_at = float("-inf")
        if self._exec is not None:
            self._exec.expire()


def _read_token(path: str) -> str:
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(f"token file {path}: {e.strerror}") from e
    if not token:
        raise ConfigError(f"token file {path} is empty")
    return token


class ExecPlugin:
    """A client-go credential plugin (client.authentication.k8s.io/v1 or v1beta1 ExecCredential): run with the
    kubeconfig's command, args and env, its token kept until its expirationTimestamp."""

    def __init__(self, spec: dict, base_dir: str) -> None:
        command = spec.get("command")
        if not isinstance(command, str) or not command:
            raise ConfigError("users[].user.exec: no command")
        if "/" in command and not os.path.isabs(command):  # a relative path is the kubeconfig's
            command = os.path.join(base_dir, command)
        self.argv = [command, *(str(a) for a in spec.get("args") or [])]
        self.api_version = str(spec.get("apiVersion") or "client.authentication.k8s.io/v1")
        self.env = {str(e["name"]): str(e["value"]) for e in spec.get("env") or [] if isinstance(e, dict)}
        self._lock = threading.Lock()
        self._token = ""
        self._expires: float | None = None  # monotonic; None: until a 401

    def token(self) -> str:
        with self._lock:
            if not self._token or (self._expires is not None and time.monotonic() >= self._expires):
                self._token, self._expires = self._run()
            return self._token

    def expire(self) -> None:
        with self._lock:
            self._token = ""

    def _run(self) -> tuple[str, float | None]:
        info = {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
        env = {**os.environ, **self.env, "KUBERNETES_EXEC_INFO": json.dumps(info)}
        try:
            done = subprocess.run(
                self.argv, env=env, capture_output=True, timeout=EXEC_TIMEOUT, stdin=subprocess.DEVNULL, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConfigError(f"exec credential plugin {self.argv[0]}: {e}") from e
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()[-300:]
            raise ConfigError(f"exec credential plugin {self.argv[0]} exited {done.returncode}: {detail}")
        try:
            status = json.loads(done.stdout).get("status") or {}
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"exec credential plugin {self.argv[0]}: not an ExecCredential") from e
        token = status.get("token")
        if not isinstance(token, str) or not token:
            what = "a client certificate (not supported)" if status.get("clientCertificateData") else "no token"
            raise ConfigError(f"exec credential plugin {self.argv[0]} gave {what}")
        expires = status.get("expirationTimestamp")
        if not expires:
            return token, None
        try:
            at = datetime.datetime.fromisoformat(str(expires).replace("Z", "+00:00"))
        except ValueError as e:
            raise ConfigError(f"exec credential plugin {self.argv[0]}: expirationTimestamp {expires!r}") from e
        left = (at - datetime.datetime.now(datetime.UTC)).total_seconds()
        return token, time.monotonic() + max(left - 10.0, 0.0)  # renewed a little before it runs out


def from_service_account(
    api_server: str = "", secrets: str = SERVICE_ACCOUNT_DIR, environ: Mapping[str, str] | None = None
) -> ApiClient:
    """The pod's service account: its token (read again as it rotates) and CA; the API server at `api_server`,
    else KUBERNETES_SERVICE_HOST/PORT (which the DaemonSet sets to the real address: the `kubernetes` ClusterIP
    would need noded to have programmed it first)."""
    env = os.environ if environ is None else environ
    server = api_server
    if not server:
        host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise ConfigError("in cluster: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set")
        server = f"https://{f'[{host}]' if ':' in host else host}:{port}"
    credentials = Credentials(token_file=f"{secrets}/token")
    credentials.headers()  # no token file: said now, not at the first list
    return ApiClient(server, _tls(ca_file=f"{secrets}/ca.crt"), credentials)


def from_kubeconfig(path: str | None = None) -> ApiClient:
    """The current context of a kubeconfig (`path`, else the first of $KUBECONFIG, else ~/.kube/config)."""
    if not path:
        listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
        path = next((p for p in listed if os.path.exists(p)), os.path.expanduser("~/.kube/config"))
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"kubeconfig {path}: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"kubeconfig {path}: not a mapping")
    base = os.path.dirname(os.path.abspath(path))
    context = _named(doc, "contexts", doc.get("current-context"), path, "context")
    cluster = _named(doc, "clusters", context.get("cluster"), path, "cluster")
    user = _named(doc, "users", context.get("user"), path, "user") if context.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise ConfigError(f"kubeconfig {path}: the cluster has no server")
    if user.get("auth-provider"):
        name = (user["auth-provider"] or {}).get("name", "?")
        raise ConfigError(f"kubeconfig {path}: auth-provider {name!r} is not supported (use a token or exec plugin)")
    _one_of(path, cluster, "certificate-authority", "certificate-authority-data")
    _one_of(path, user, "client-certificate", "client-certificate-data")
    _one_of(path, user, "client-key", "client-key-data")
    given = {"token": ("token", "tokenFile"), "basic auth": ("username", "password"), "exec": ("exec",)}
    methods = [name for name, keys in given.items() if any(user.get(k) for k in keys)]
    if len(methods) > 1:  # clientcmd's rule (a token file is read only without a token)
        raise ConfigError(f"kubeconfig {path}: more than one authentication method ({', '.join(methods)})")
    tls = None
    if server.startswith("https://"):
        tls = _tls(
            ca_file=_file(cluster, "certificate-authority", base),
            ca_data=_data(cluster, "certificate-authority-data", path),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            cert=(_file(user, "client-certificate", base), _data(user, "client-certificate-data", path)),
            key=(_file(user, "client-key", base), _data(user, "client-key-data", path)),
        )
    basic = (str(user["username"]), str(user.get("password") or "")) if user.get("username") else None
    credentials = Credentials(
        token=str(user.get("token") or ""),
        token_file=_file(user, "tokenFile", base) or "",
        exec_plugin=ExecPlugin(user["exec"], base) if user.get("exec") else None,
        basic=basic,
    )
    proxy = cluster.get("proxy-url") or None
    return ApiClient(server, tls, credentials, proxy=proxy, server_hostname=cluster.get("tls-server-name") or None)


def _one_of(path: str, section: dict, a: str, b: str) -> None:
    """As clientcmd's validation: a file and inline data for the same thing is an error, not a choice."""
    if section.get(a) and section.get(b):
        raise ConfigError(f"kubeconfig {path}: {a} and {b} are both given")


def _named(doc: dict, section: str, name: object, path: str, what: str) -> dict:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(what)
            return value if isinstance(value, dict) else {}
    raise ConfigError(f"kubeconfig {path}: no {what} named {name!r}")


def _file(section: dict, key: str, base: str) -> str | None:
    value = section.get(key)
    return os.path.join(base, value) if isinstance(value, str) and value else None


def _data(section: dict, key: str, path: str) -> bytes | None:
    value = section.get(key)
    if not value:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as e:
        raise ConfigError(f"kubeconfig {path}: {key} is not base64") from e


def _tls(
    ca_file: str | None = None,
    ca_data: bytes | None = None,
    insecure: bool = False,
    cert: tuple[str | None, bytes | None] = (None, None),
    key: tuple[str | None, bytes | None] = (None, None),
) -> ssl.SSLContext:
    """A client TLS context: the API server checked against its CA (the system's when none is named), and a
    client certificate when there is one."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file, cadata=ca_data.decode() if ca_data and not ca_file else None)
        if insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert != (None, None) or key != (None, None):
            _load_client_cert(ctx, cert, key)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ConfigError(f"TLS: {e}") from e
    return ctx


def _load_client_cert(
    ctx: ssl.SSLContext, cert: tuple[str | None, bytes | None], key: tuple[str | None, bytes | None]
) -> None:
    """The ssl module loads a certificate and key from files only: inline data goes through a private file
    removed as soon as it is loaded."""
    if cert[0] and key[0]:
        ctx.load_cert_chain(cert[0], key[0])
        return
    cert_pem = cert[1] if cert[1] is not None else (pathlib.Path(cert[0]).read_bytes() if cert[0] else b"")
    key_pem = key[1] if key[1] is not None else (pathlib.Path(key[0]).read_bytes() if key[0] else b"")
    if not cert_pem or not key_pem:
        raise ValueError("a client certificate needs both its certificate and its key")
    fd, scratch = tempfile.mkstemp(prefix="noded-client-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cert_pem.rstrip(b"\n") + b"\n" + key_pem)
        ctx.load_cert_chain(scratch)
    finally:
        os.unlink(scratch)


def load(
    kubeconfig: str | None, in_cluster: bool, api_server: str = "", secrets: str = SERVICE_ACCOUNT_DIR
) -> ApiClient:
    """The client a source config names: the service account in cluster, else the kubeconfig."""
    if in_cluster:
        return from_service_account(api_server, secrets)
    return from_kubeconfig(kubeconfig)
