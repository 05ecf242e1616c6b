"""FlexPipe's model cache: checkpoints written once into `<cache>/models/<name>`, visible only when complete.

A checkpoint is built in a temporary sibling directory, marked complete and renamed into place, so a reader
never sees a half-written directory: the target either does not exist or holds every file and the marker.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator

COMPLETE_MARKER = ".complete"


CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)  # what a cached checkpoint directory holds, whichever model it is


def default_cache_dir() -> pathlib.Path:
    """Return `$FLEXPIPE_CACHE_DIR` if set, else `~/.cache/flexpipe`."""
    env = os.environ.get("FLEXPIPE_CACHE_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "flexpipe"


def models_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The directory that holds the cached checkpoints: `<cache_dir or default_cache_dir()>/models`."""
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache / "models"


def is_installed(target: os.PathLike | str, required_files: Iterable[str]) -> bool:
    """True if `target` holds every file of `required_files` and the completeness marker."""
    path = pathlib.Path(target)
    return all((path / name).is_file() for name in (*required_files, COMPLETE_MARKER))


def install_atomically(
    target: pathlib.Path,
    write: Callable[[pathlib.Path], None],
    required_files: Iterable[str],
    *,
    exclusive: bool = False,
) -> pathlib.Path:
    """Make `target` a complete checkpoint unless it already is; return `target`.

    `write(directory)` fills an empty temporary sibling of `target`, which is then marked complete and renamed
    into place; an exception from `write` leaves `target` as it was and removes the temporary directory.
    Without `exclusive`, concurrent callers may each write a copy and the first rename wins (cheap writers);
    with it, they take turns on a lock file next to `target`, so only the first one writes and the others find
    the result, and the lock holder deletes what a writer killed mid-way (SIGKILL, power loss) left behind.
    """
    required_files = tuple(required_files)
    if is_installed(target, required_files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not exclusive:
        _write_and_rename(target, write, required_files)
        return target
    with _exclusive_lock(_lock_file(target)):
        if not is_installed(target, required_files):
            _remove_temporaries_of_dead_writers(target)
            _write_and_rename(target, write, required_files)
    return target


def _lock_file(target: pathlib.Path) -> pathlib.Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def _exclusive_lock(path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if needed; never removed, as another process may be
    waiting on it). The kernel drops the lock if this process dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_temporaries_of_dead_writers(target: pathlib.Path) -> None:
    """Only the lock holder writes, so a temporary sibling seen while holding the lock has no live writer."""
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _write_and_rename(target: pathlib.Path, write: Callable[[pathlib.Path], None], required_files: tuple) -> None:
    tmp = _temporary_sibling(target)
    try:
        write(tmp)
        _readable_under_umask(tmp)
        (tmp / COMPLETE_MARKER).write_text(target.name + "\n")
        _remove_incomplete(target, required_files)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_installed(target, required_files):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temporary_sibling(target: pathlib.Path) -> pathlib.Path:
    """An empty directory next to `target` with the permissions of a directory made under the umask."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _readable_under_umask(directory: pathlib.Path) -> None:
    """Give the files of `directory` the permissions of files made under the umask (safetensors writes 0600)."""
    mode = 0o666 & ~_umask()
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, mode)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove_incomplete(target: pathlib.Path, required_files: tuple) -> None:
    """Move a leftover incomplete `target` (e.g. from an older FlexPipe) out of the way and delete it."""
    if not target.exists() or is_installed(target, required_files):
        return
    stale = target.parent / f".{target.name}.stale-{uuid.uuid4().hex}"
    try:
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    except OSError:
        pass
