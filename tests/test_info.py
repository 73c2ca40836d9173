"""info() and resolve_backend(): what this build can do here, and why not."""
from __future__ import annotations

import errno
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

import llmio_native as lio
from llmio_native import _core
from llmio_native._native import _cuda

from conftest import IO_URING_USABLE

pytestmark = pytest.mark.usefixtures("clean_io_env")

TOP_KEYS = {"version", "compiled", "zstd", "io_uring", "backend", "env_backend", "cuda", "kernel", "python", "faults"}


def test_info_keys_and_types():
    i = lio.info()
    assert TOP_KEYS <= set(i), TOP_KEYS - set(i)
    assert isinstance(i["version"], str) and i["version"] == lio.__version__ == _core.__version__
    assert set(i["compiled"]) == {"io_uring", "cuda", "zstd"}
    assert all(type(v) is bool for v in i["compiled"].values()), i["compiled"]
    probe = i["io_uring"]
    assert set(probe) == {"compiled", "usable", "errno", "reason"}
    assert type(probe["compiled"]) is bool and type(probe["usable"]) is bool
    assert type(probe["errno"]) is int and isinstance(probe["reason"], str)
    assert isinstance(i["backend"], str) and i["env_backend"] is None and i["faults"] is None
    assert i["zstd"] is None or isinstance(i["zstd"], str)
    cuda = i["cuda"]
    assert type(cuda["built"]) is bool and type(cuda["device_count"]) is int and cuda["device_count"] >= 0
    if cuda["device_count"] == 0:
        assert isinstance(cuda["reason"], str) and cuda["reason"]
    assert i["kernel"] == platform.release() and i["python"] == platform.python_version()
    json.dumps(i)  # printable as is (bug reports, `llmio bench` headers)


def test_compiled_flags_match_the_build():
    i = lio.info()
    assert i["compiled"]["io_uring"] is bool(_core.HAVE_URING)
    assert i["io_uring"]["compiled"] is i["compiled"]["io_uring"]
    assert i["compiled"]["cuda"] is (_cuda is not None) and i["cuda"]["built"] is (_cuda is not None)
    try:
        import zstandard  # noqa: F401

        have_zstd = True
    except ImportError:
        have_zstd = False
    assert i["compiled"]["zstd"] is have_zstd and (i["zstd"] is not None) is have_zstd


def test_io_uring_probe_is_coherent():
    probe = lio.info()["io_uring"]
    assert probe["usable"] is IO_URING_USABLE
    if probe["usable"]:
        assert probe["compiled"] and probe["errno"] == 0 and probe["reason"] == ""
        assert lio.info()["backend"] == "io_uring"
    else:
        assert probe["errno"] > 0 and probe["reason"], probe
        assert lio.info()["backend"] == "threads"
    if not probe["compiled"]:
        assert probe["usable"] is False and "liburing" in probe["reason"]


@pytest.mark.parametrize("env", ["threads", "io_uring", "auto", " threads ", ""])
def test_backend_reflects_llmio_backend(monkeypatch, env):
    monkeypatch.setenv("LLMIO_BACKEND", env)
    i = lio.info()
    assert i["env_backend"] == (env or None)
    choice = env.strip() or "auto"
    if choice == "auto":
        expect = "io_uring" if IO_URING_USABLE else "threads"
    elif choice == "io_uring" and not IO_URING_USABLE:
        expect = None
    else:
        expect = choice
    if expect is None:
        assert i["backend"].startswith("error:") and "LLMIO_BACKEND" in i["backend"]
    else:
        assert i["backend"] == expect
    if env.strip() and expect is not None:
        for arg in ("auto", "threads", "io_uring"):  # the environment wins over the argument
            assert lio.resolve_backend(arg) == expect


def test_bogus_llmio_backend_raises_value_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMIO_BACKEND", "bogus")
    i = lio.info()  # reports, does not raise
    assert i["backend"].startswith("error:") and "LLMIO_BACKEND" in i["backend"] and "bogus" in i["backend"]
    assert i["env_backend"] == "bogus"
    for arg in ("auto", "threads"):
        with pytest.raises(ValueError, match="LLMIO_BACKEND.*bogus"):
            lio.resolve_backend(arg)
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc")
    with pytest.raises(ValueError, match="LLMIO_BACKEND"):
        lio.Reader([str(p)])


def test_bad_backend_argument_raises_value_error():
    with pytest.raises(ValueError, match="backend.*'uring'"):
        lio.resolve_backend("uring")
    assert lio.resolve_backend("threads") == "threads"
    assert lio.resolve_backend() == ("io_uring" if IO_URING_USABLE else "threads")


@pytest.mark.skipif(not _core.HAVE_URING, reason="built without liburing: the probe never runs")
@pytest.mark.parametrize("fault,err", [("uring_eperm", errno.EPERM), ("uring_enosys", errno.ENOSYS)])
def test_info_reports_injected_io_uring_denial(faults, monkeypatch, fault, err):
    faults(fault)
    i = lio.info()
    assert i["faults"] == fault
    assert i["io_uring"]["usable"] is False and i["io_uring"]["errno"] == err and i["io_uring"]["reason"]
    assert i["backend"] == "threads"
    monkeypatch.setenv("LLMIO_BACKEND", "io_uring")
    forced = lio.info()["backend"]
    assert forced.startswith("error:") and i["io_uring"]["reason"] in forced
    with pytest.raises(lio.UnsupportedError):
        lio.resolve_backend("auto")
    monkeypatch.delenv("LLMIO_BACKEND")
    faults("")
    assert lio.info()["faults"] is None and lio.info()["io_uring"]["usable"] is IO_URING_USABLE


def test_unknown_fault_raises_and_changes_nothing(faults):
    faults("uring_enosys")
    with pytest.raises(ValueError, match="no_such_fault"):
        faults("no_such_fault")
    assert lio.info()["faults"] == "uring_enosys"


@pytest.mark.skipif(not _core.HAVE_URING, reason="built without liburing: the probe never runs")
def test_llmio_faults_environment_is_read_at_import():
    child = textwrap.dedent(
        """
        import json, llmio_native as lio
        i = lio.info()
        print(json.dumps({"io_uring": i["io_uring"], "faults": i["faults"], "backend": i["backend"]}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMIO_")}
    env["LLMIO_FAULTS"] = "uring_eperm"
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["faults"] == "uring_eperm" and res["backend"] == "threads"
    assert res["io_uring"]["usable"] is False and res["io_uring"]["errno"] == errno.EPERM
