"""Output directories: never delete or overwrite what sau did not write.

Every command that writes a directory (`demo`, `unlearn`, `prune --out`, `data`) goes
through this module:

1. `check_out_dir` (before anything is written): --out is a directory or absent, not a
   symbolic link, does not overlap any input path, its parent is writable, and if it is
   not empty it is an earlier sau output: it carries `MARKER`, a JSON file listing every
   file sau wrote there, and holds nothing else.
2. `OutLock` (once the checks passed): an exclusive lock on `.<name>.lock` beside --out,
   held with flock (released by the kernel when its owner dies, so a lock file left by
   a killed run is stale and is taken over) and holding the owner's pid for the message
   a second run prints.
3. `staging_dir`: a fresh hidden sibling the command writes into; removed on failure.
4. `publish`: writes the marker into the staging directory and renames it to --out. An
   earlier sau output is first renamed aside; only the files its marker lists are then
   removed (and the directories they leave empty). Anything else stays where it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from sau.errors import SAUError

__all__ = [
    "MARKER",
    "OutLock",
    "check_out_dir",
    "check_writable_dir",
    "publish",
    "staging_dir",
    "write_atomic",
]

MARKER = ".sau-output.json"
_KIND = "sau output"


def _parent_to_create(path: Path) -> Path:
    """The nearest existing ancestor of `path` (where mkdir -p would start writing)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


def check_writable_dir(path: Path, flag: str) -> None:
    """Refuse a directory option that is a file or cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise SAUError(f"{flag} {path}: exists and is not a directory")
    base = _parent_to_create(path)
    if not base.is_dir():
        raise SAUError(f"{flag} {path}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise SAUError(f"{flag} {path}: {base} is not writable")


def _listed_files(out: Path) -> set[str] | None:
    """The relative paths the marker in `out` lists, or None when it has no valid one."""
    marker = out / MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))  # JSON only, never pickle
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("kind") == _KIND else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    safe = set()
    for name in files:
        parts = Path(name).parts
        # Plain relative paths only: a marker must not reach outside its directory.
        if not parts or Path(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
            return None
        safe.add(Path(name).as_posix())
    return safe


def _foreign_entries(out: Path, listed: set[str]) -> list[str]:
    """Entries under `out` that the marker does not list (symlinks always count)."""
    parents = {p.as_posix() for f in listed for p in Path(f).parents if p != Path(".")}
    foreign = []
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if rel == MARKER:
            continue
        if path.is_symlink() or (path.is_dir() and rel not in parents):
            foreign.append(rel)
        elif not path.is_dir() and rel not in listed:
            foreign.append(rel)
    return foreign


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_out_dir(out: Path, *, inputs: Iterable[str | os.PathLike | None] = (), flag="--out"):
    """Refuse an output directory sau may not (re)write; writes nothing.

    Args:
        out: the directory the command will publish.
        inputs: every path the command reads (model directories, data and config files);
            --out may not be, contain or lie inside any of them.
        flag: the option's name for messages.

    Raises:
        SAUError: one line naming `out` and the reason.
    """
    if out.is_symlink():
        raise SAUError(f"{flag} {out}: is a symbolic link; give the directory itself")
    check_writable_dir(out, flag)
    real = out.resolve()
    for path in inputs:
        if path is not None and _overlaps(real, Path(path).expanduser().resolve()):
            raise SAUError(f"{flag} {out}: overlaps the input {path}; choose another directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    listed = _listed_files(out)
    if listed is None:
        raise SAUError(
            f"{flag} {out}: directory exists, is not empty and is not a sau output "
            f"(no valid {MARKER}); choose another directory"
        )
    foreign = _foreign_entries(out, listed)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise SAUError(
            f"{flag} {out}: holds files sau did not write ({', '.join(foreign[:3])}{more}); "
            "move them or choose another directory"
        )


class OutLock:
    """Exclusive lock for one output directory: `.<name>.lock` beside it.

    Use as a context manager after `check_out_dir`. A second run on the same --out gets
    one SAUError line naming the owner's pid. The lock is a flock on the file, which the
    kernel drops when its owner dies, so a lock file left behind by a killed run (its pid
    dead) is taken over; the file holds the pid for the message only.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutLock:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:  # O_NOFOLLOW: a planted symlink must not make us truncate its target
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise SAUError(f"{self.path}: cannot take the lock: {err.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise SAUError(
                    f"{self.out}: another sau run (pid {self._owner()}) is writing it; "
                    f"wait for it to finish (lock: {self.path})"
                ) from None
            # The previous owner may have unlinked the file between our open and flock:
            # then we hold a lock on a file nobody else can see. Retry on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = os.pread(fd, 64, 0)
        if stale and not re.fullmatch(rb"\d+\n?", stale):
            os.close(fd)  # not a lock file sau wrote (a pid): leave it as it is
            raise SAUError(f"{self.path}: exists and is not a sau lock file; move it away")
        if stale:
            print(
                f"sau: taking over the lock of pid {stale.decode().strip()}, which is no "
                "longer running",
                file=sys.stderr,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def _owner(self) -> str:
        try:
            return self.path.read_text(encoding="ascii", errors="replace").strip() or "?"
        except OSError:
            return "?"

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # ours: we hold the lock on exactly this file
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A fresh hidden sibling of `out` to write into; removed if still there at the end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # created by us, just above


def _remove_listed(old: Path, listed: set[str]) -> bool:
    """Remove the listed files from `old`, then directories left empty; True if all gone."""
    for rel in listed | {MARKER}:
        path = old / rel
        if path.is_file() and not path.is_symlink():
            path.unlink()
    for path in sorted(old.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.rmdir()  # only succeeds when empty
    with contextlib.suppress(OSError):
        old.rmdir()
    return not old.exists()


def publish(tmp: Path, out: Path, *, command: str) -> None:
    """Make the finished `tmp` directory `out`, atomically (one rename).

    Writes the marker (every file under `tmp`) first. An earlier sau output at `out` is
    renamed aside and only the files its own marker lists are removed; an empty `out` is
    replaced. Call under `OutLock(out)`: `out` is checked again here, so files a user put
    there since `check_out_dir` are never lost.
    """
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    marker = {"kind": _KIND, "command": command, "files": files}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    if not out.exists():
        os.rename(tmp, out)
        return
    check_out_dir(out)  # again, under the lock: what is there now may be replaced
    listed = _listed_files(out) or set()
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, aside / "out")
    os.rename(tmp, out)
    if _remove_listed(aside / "out", listed):
        os.rmdir(aside)
    else:
        print(f"sau: kept {aside / 'out'}: it holds files sau did not write", file=sys.stderr)


# The unlearning work directory: checkpoints of a run in progress, beside --out.
WORK_MARKER = ".sau-work"


def work_dir_of(out: Path) -> Path:
    """`.<name>.partial` beside `out`: where an unfinished run keeps its checkpoints."""
    return out.parent / f".{out.name}.partial"


def make_work_dir(work: Path) -> None:
    """Create `work` with the marker that later allows removing it."""
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("written by sau; removed when the run finishes\n")


def is_work_dir(work: Path) -> bool:
    """True when `work` is a directory sau created with `make_work_dir`."""
    return work.is_dir() and not work.is_symlink() and (work / WORK_MARKER).is_file()


def remove_work_dir(work: Path) -> None:
    """Delete a work directory sau created (refuses one without the marker)."""
    if not work.exists():
        return
    if not is_work_dir(work):
        raise SAUError(f"{work}: not a sau work directory ({WORK_MARKER} missing); left as is")
    shutil.rmtree(work)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary sibling and os.replace (never half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
