"""The crash-safe commit protocol every checkpoint writer uses.

A checkpoint is written under a *staging* name beside its target (same directory, so the final
rename never crosses a file system), every file is made durable (``fdatasync``), the index or
metadata is written last, then one rename publishes it and the parent directory is fsynced so
the rename itself survives a power cut. A checkpoint is never overwritten in place:

* a file target is replaced by ``rename(2)`` over it (atomic on POSIX);
* a directory target that already exists is swapped with the staging directory in one
  ``renameat2(RENAME_EXCHANGE)``; the old checkpoint, now under the staging name, is removed
  afterwards. Where the exchange is not available (old kernels, some file systems) the old
  directory is first renamed aside to ``.NAME.old-TOKEN``; a process killed between the two
  renames leaves the target missing and the old checkpoint there, and :func:`recover` (called by
  every loader in this package) renames it back.

So a process killed at any instant leaves, under the final name, either the previous checkpoint
or the new one, whole. Staging names are ``.NAME.tmp-HOST-PID-RANDOM``: :func:`remove_stale`
deletes those left by dead processes of this host.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterable, Iterator, Union

from ..io.writer import fsync_path  # the engine's: errors name the path

PathLike = Union[str, "os.PathLike[str]"]

_TMP = ".tmp-"
_OLD = ".old-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _token() -> str:
    host = socket.gethostname().replace("-", "_").replace(".", "_")[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def staging_path(target: PathLike, token: str | None = None) -> Path:
    """The staging name for ``target``: ``DIR/.NAME.tmp-TOKEN`` (``token`` defaults to
    host-pid-random; ranks that must share one staging directory pass the same token).

    Raises:
        ValueError: the target has no file name, or the token contains a path separator.
    """
    t = Path(os.fspath(target))
    if not t.name or t.name in (".", ".."):
        raise ValueError(f"checkpoint target {os.fspath(target)!r} has no file name")
    tok = token if token is not None else _token()
    if "/" in tok or not tok:
        raise ValueError(f"bad staging token {tok!r}")
    return t.parent / f".{t.name}{_TMP}{tok}"


def _sync_tree(root: Path, skip: set[str]) -> None:
    """fdatasync every regular file under root (except those named in skip), then fsync every
    directory bottom-up."""
    dirs = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(dirpath)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if p in skip or not os.path.isfile(p):
                continue
            fsync_path(p, data_only=True)
    for d in reversed(dirs):
        fsync_path(d)


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the kernel/libc/file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    if os.environ.get("LLMIO_COMMIT_NO_EXCHANGE"):  # tests force the fallback path
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, f"cannot swap {a} with {b}: {os.strerror(e)}")


def commit(staging: PathLike, target: PathLike, *, synced: Iterable[PathLike] = ()) -> None:
    """Publish ``staging`` (a file or a directory) under ``target``, durably and atomically.

    Every file in the staging tree is fdatasynced (except those listed in ``synced``, which the
    caller already flushed), the staging directories are fsynced, the rename or exchange is made,
    and the parent directory is fsynced. An existing target is replaced whole, never written into.

    Raises:
        FileNotFoundError: ``staging`` does not exist.
        IsADirectoryError, NotADirectoryError: a file would replace a directory or the reverse.
        OSError: a flush or a rename failed (the message names the path); the previous
            checkpoint is then still in place.
    """
    src, dst = Path(os.fspath(staging)), Path(os.fspath(target))
    if not src.exists():
        raise FileNotFoundError(errno.ENOENT, f"staging checkpoint {src} does not exist")
    if src.parent.resolve() != dst.parent.resolve():
        raise ValueError(f"staging {src} must be in the target's directory {dst.parent}")
    skip = {os.fspath(p) for p in synced}
    if src.is_dir():
        if dst.exists() and not dst.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"cannot replace file {dst} with a checkpoint directory")
        _sync_tree(src, skip)
        if not dst.exists():
            os.rename(src, dst)
            fsync_path(dst.parent)
            return
        if _rename_exchange(src, dst):
            fsync_path(dst.parent)
            shutil.rmtree(src, ignore_errors=True)  # the previous checkpoint, now under src
            return
        aside = dst.parent / f".{dst.name}{_OLD}{_token()}"
        os.rename(dst, aside)
        os.rename(src, dst)
        fsync_path(dst.parent)
        shutil.rmtree(aside, ignore_errors=True)
        return
    if dst.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot replace directory {dst} with a checkpoint file")
    if os.fspath(src) not in skip:
        fsync_path(src, data_only=True)
    os.rename(src, dst)
    fsync_path(dst.parent)


def discard(staging: PathLike) -> None:
    """Remove a staging file or directory (after a failed save); never raises."""
    p = Path(os.fspath(staging))
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()


@contextlib.contextmanager
def atomic_path(target: PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Context manager for a one-process save: yields a staging path beside ``target`` (created
    empty when ``directory``); on a clean exit commits it with :func:`commit`, on an exception
    discards it and re-raises. The target is untouched until the commit.

    Raises:
        OSError: from creating the staging directory or from :func:`commit`.
    """
    st = staging_path(target)
    remove_stale(target)
    if directory:
        st.mkdir()
    try:
        yield st
    except BaseException:
        discard(st)
        raise
    try:
        commit(st, target)
    except BaseException:
        discard(st)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(target: PathLike) -> bool:
    """Finish an interrupted directory replacement: if ``target`` is missing and a previous
    checkpoint was set aside under ``.NAME.old-...`` (the no-exchange fallback was killed between
    its two renames), rename it back. Returns True when something was restored. Loaders call it.

    Raises:
        Nothing (a race with another process restoring the same checkpoint is harmless).
    """
    t = Path(os.fspath(target))
    if t.exists() or not t.parent.is_dir():
        return False
    prefix = f".{t.name}{_OLD}"
    olds = sorted((p for p in t.parent.iterdir() if p.name.startswith(prefix)),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for p in olds:
        try:
            os.rename(p, t)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            fsync_path(t.parent)
        return True
    return False


def remove_stale(target: PathLike) -> list[Path]:
    """Delete staging files/directories of ``target`` left by processes of this host that no
    longer run (a killed save). Returns what was removed. Staging of live processes and of other
    hosts is kept.

    Raises:
        Nothing.
    """
    t = Path(os.fspath(target))
    if not t.parent.is_dir():
        return []
    host = socket.gethostname().replace("-", "_").replace(".", "_")[:32] or "host"
    removed = []
    for prefix in (f".{t.name}{_TMP}", f".{t.name}{_OLD}"):
        for p in t.parent.iterdir():
            if not p.name.startswith(prefix):
                continue
            parts = p.name[len(prefix):].split("-")
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            if _pid_alive(int(parts[1])):
                continue
            if prefix.endswith(_OLD) and not t.exists():
                continue  # the only copy of the previous checkpoint: recover() will restore it
            discard(p)
            removed.append(p)
    return removed


def is_staging_name(name: str) -> bool:
    """True for names this module gives to staging or set-aside checkpoints (so directory
    scans never mistake them for checkpoints).

    Raises:
        Nothing.
    """
    return name.startswith(".") and (_TMP in name or _OLD in name)
