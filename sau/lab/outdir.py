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

`sau sweep` writes into its directory as it goes (that makes it resumable), so it has
rules of its own with the same aim (`check_sweep_dir`, `SweepDir`): the directory is new,
empty, or one a sweep created, which carries `SWEEP_MARKER` listing every file the
sweep wrote there; another command's output (`MARKER`) is refused, and so is a file the
sweep would write that it did not write itself. Every file is written through
`atomic_write`: a temporary sibling created exclusively (O_EXCL, never following a
symbolic link), filled through its descriptor, then renamed over the name.
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
    "SWEEP_MARKER",
    "OutLock",
    "SweepDir",
    "atomic_write",
    "check_out_dir",
    "check_sweep_dir",
    "check_writable_dir",
    "publish",
    "staging_dir",
    "write_atomic",
]

MARKER = ".sau-output.json"
_KIND = "sau output"
SWEEP_MARKER = ".sau-sweep.json"
_SWEEP_KIND = "sau sweep"


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


def _listed_files(out: Path, name: str = MARKER, kind: str = _KIND) -> set[str] | None:
    """The relative paths the marker `name` in `out` lists, or None when it has no valid
    one (of `kind`)."""
    marker = out / name
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))  # JSON only, never pickle
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("kind") == kind else None
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


def _new_or_empty(out: Path, inputs: Iterable, flag: str) -> bool:
    """The rules every output directory follows (not a symbolic link or a file, writable,
    no overlap with an input; SAUError otherwise); True when `out` is absent or empty."""
    if out.is_symlink():
        raise SAUError(f"{flag} {out}: is a symbolic link; give the directory itself")
    check_writable_dir(out, flag)
    real = out.resolve()
    for path in inputs:
        if path is not None and _overlaps(real, Path(path).expanduser().resolve()):
            raise SAUError(f"{flag} {out}: overlaps the input {path}; choose another directory")
    return not out.is_dir() or not any(out.iterdir())


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
    if _new_or_empty(out, inputs, flag):
        return
    listed = _listed_files(out)
    if listed is None and (out / SWEEP_MARKER).exists():
        raise SAUError(f"{flag} {out}: holds a sau sweep ({SWEEP_MARKER}); choose another one")
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
    atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write(path: Path, fill) -> bool:
    """Write `path` whole or not at all: `fill(fh)` writes a binary file object opened on
    a fresh temporary sibling, which then replaces `path` (os.replace).

    The temporary file is created with O_CREAT | O_EXCL | O_NOFOLLOW under a random name
    (tempfile.mkstemp), and written through its descriptor only, so nothing planted in
    the directory (a symbolic link, a file of the same name) is ever written through.

    Args:
        path: the destination; its directory must exist.
        fill: callable(binary file) -> anything; False means "nothing to write" (the
            temporary file is removed and `path` left alone).

    Returns:
        True when `path` was written.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            wrote = fill(fh) is not False
            fh.flush()
            os.fsync(fh.fileno())
        if wrote:
            os.replace(tmp, path)
            return True
        os.unlink(tmp)
        return False
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _sweep_refusal(out: Path, writes: Iterable[str]) -> str | None:
    """Why a sweep may not write `writes` (relative paths) into the existing, non-empty
    directory `out`, or None."""
    if (out / MARKER).exists() or (out / MARKER).is_symlink():
        return f"holds the output of another sau command ({MARKER}), not a sweep's"
    listed = _listed_files(out, SWEEP_MARKER, _SWEEP_KIND)
    if listed is None:
        return f"directory exists, is not empty and is not a sau sweep (no valid {SWEEP_MARKER})"
    for rel in writes:
        parts = Path(rel).parts
        for depth in range(1, len(parts)):
            sub = out.joinpath(*parts[:depth])
            if sub.is_symlink() or (sub.exists() and not sub.is_dir()):
                return f"{sub.relative_to(out)} is not a directory the sweep made"
        path = out / rel
        if (path.exists() or path.is_symlink()) and rel not in listed:
            return f"holds {rel}, which the sweep would write but did not write"
        if path.is_dir() and not path.is_symlink():
            return f"{rel} is a directory, where the sweep writes a file"
    return None


def check_sweep_dir(
    out: Path,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    writes: Iterable[str] = (),
    flag: str = "--out",
) -> None:
    """Refuse a directory `sau sweep` may not write into; writes nothing.

    The rules of `check_out_dir` (not a symbolic link or a file, writable, no overlap with
    an input), except that a non-empty directory must be a sweep's: it carries a valid
    `SWEEP_MARKER`, no other command's `MARKER`, and every one of `writes` that exists
    is listed in the marker (the sweep wrote it) and lies in directories the sweep made.

    Args:
        out: the sweep's directory.
        inputs: every path the sweep reads; `out` may not be, contain or lie inside one.
        writes: the relative paths the sweep would write.

    Raises:
        SAUError: one line naming `out` and the reason.
    """
    if _new_or_empty(out, inputs, flag):
        return
    why = _sweep_refusal(out, writes)
    if why:
        raise SAUError(f"{flag} {out}: {why}; choose another directory")


class SweepDir:
    """A sweep's directory, written as the sweep goes. Use under `OutLock(out)`.

    Reading (`owns`) needs no `open`: the marker is read when the object is made. `open`
    checks the directory again (`check_sweep_dir`), creates it and its marker; then
    every write goes through `write`, which lists the file in the marker first (so
    an interrupted write leaves nothing unlisted) and writes it with `atomic_write`.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        listed = _listed_files(self.out, SWEEP_MARKER, _SWEEP_KIND) if self.out.is_dir() else None
        self._listed: set[str] = listed or set()

    def open(self, writes: Iterable[str] = ()) -> SweepDir:
        """Check (again, under the lock), create the directory and its marker."""
        check_sweep_dir(self.out, writes=writes)
        self.out.mkdir(parents=True, exist_ok=True)
        self._listed = _listed_files(self.out, SWEEP_MARKER, _SWEEP_KIND) or set()
        self._save_marker()
        return self

    def owns(self, rel: str) -> bool:
        """True when the sweep wrote `rel` and it is a regular file (not a link)."""
        path = self.out / rel
        return rel in self._listed and path.is_file() and not path.is_symlink()

    def write(self, rel: str, fill) -> bool:
        """`atomic_write` of `self.out / rel` (a relative path the sweep owns or may
        create); returns whether `fill` wrote it.

        Raises:
            SAUError: `rel` exists and the sweep did not write it, or one of its
                directories is not a directory the sweep made.
        """
        path = self.out / rel
        why = _sweep_refusal(self.out, [rel])
        if why:
            raise SAUError(f"{self.out}: {why}")
        for depth in range(1, len(Path(rel).parts)):
            Path(self.out, *Path(rel).parts[:depth]).mkdir(exist_ok=True)
        new = rel not in self._listed
        if new:  # listed before it exists: a kill in between leaves nothing unlisted
            self._listed.add(rel)
            self._save_marker()
        wrote = False
        try:
            wrote = atomic_write(path, fill)
        finally:
            if new and not wrote:  # never written: not ours after all
                self._listed.discard(rel)
                self._save_marker()
        return wrote

    def write_text(self, rel: str, text: str) -> None:
        """`write` of a UTF-8 text."""
        self.write(rel, lambda fh: fh.write(text.encode("utf-8")))

    def _save_marker(self) -> None:
        marker = {"kind": _SWEEP_KIND, "command": "sweep", "files": sorted(self._listed)}
        write_atomic(self.out / SWEEP_MARKER, json.dumps(marker, indent=1) + "\n")
