"""Real endpoints for the remote tests and ``benchmarks/bench_remote.py``, all on 127.0.0.1.

* :func:`start_moto`: an S3-compatible server (moto in server mode, ``python -m moto.server``).
* :func:`start_nginx`: nginx serving a directory, with HTTP range requests.
* :class:`remote_proxy.FaultProxy` (``tests/remote_proxy.py``) goes in front of either.

Each starter returns a :class:`Server` (``url``, ``stop()``) or raises :class:`Missing`
(the binary or package is absent: tests skip with that reason). Pytest fixtures of
session scope are at the end (``s3_server``, ``http_server_root``); import them into a
test module with ``from remote_servers import *``.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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


def make_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` on the S3 endpoint (boto3, which moto depends on)."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)


# -- pytest fixtures (session scope) ------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_server() -> Iterator[Server]:
    """A moto S3 server for the session (skips when moto is absent)."""
    try:
        srv = start_moto()
    except Missing as exc:
        pytest.skip(str(exc))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def http_server_root(tmp_path_factory) -> Iterator[tuple[Server, str]]:
    """nginx serving a fresh directory for the session: ``(server, root)`` (skips without nginx)."""
    root = str(tmp_path_factory.mktemp("www"))
    try:
        srv = start_nginx(root)
    except Missing as exc:
        pytest.skip(str(exc))
    yield srv, root
    srv.stop()


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
           "http_server_root", "S3_ENV", "aws_env"]
