"""Where a command may write, and what it may replace: the same rules for every command that writes.

- An output never is, contains or lies inside an input. Paths are resolved (`~`, `..`, symbolic links) and
  compared by device and inode, so no spelling gets around it (nor another case on a case-insensitive disk).
- Only what qwenmlx wrote is ever replaced. Every directory it writes carries a manifest, `.qwenmlx.json`,
  listing its files; an existing directory is replaced (with --force) only if it has a finished manifest
  and holds nothing else. File names alone could not tell a conversion's output from a downloaded Hugging
  Face checkpoint or an mlx-lm model, which look the same and may have cost hours to fetch.
- Nothing half-written is left. A directory is built in a hidden sibling `.NAME.partial-PID` and renamed
  into place; a file is written beside its destination and renamed. The writer of a partial directory holds
  a lock on its manifest, which the kernel drops when the process ends, however it ends: a later run removes
  a partial directory whose lock is free (its writer is dead, whatever process its PID names now) and never
  one whose lock is held.
"""

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import QwenMLXError

MANIFEST = ".qwenmlx.json"
# The hidden siblings a directory goes through: `.NAME.partial-PID` while written, `.NAME.old-PID` while replaced.
TEMP_DIR = re.compile(r"\.(?P<name>.+)\.(?P<stage>partial|old)-(?P<pid>\d+)")

Note = Callable[[str], None]


def resolve(path: str | Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a loop of symbolic links
        raise QwenMLXError(f"{path}: cannot resolve ({e})") from None


def is_within(path: Path, folder: Path) -> bool:
    """Whether the resolved path is folder or lies below it, judged by file identity rather than by name."""
    try:
        folder_stat = folder.stat()
    except OSError:
        return False
    for ancestor in (path, *path.parents):
        try:
            if os.path.samestat(ancestor.stat(), folder_stat):
                return True
        except OSError:
            continue
    return False


def check_apart(dst: str | Path, inputs: dict[str, Path]) -> Path:
    """The resolved dst, unless it is, contains or lies inside one of the inputs (keyed by what they are)."""
    target = resolve(dst)
    for role, path in inputs.items():
        source = resolve(path)
        inside, contains = is_within(target, source), is_within(source, target)
        if inside or contains:
            relation = "is" if inside and contains else "is inside" if inside else "contains"
            raise QwenMLXError(f"{dst}: {relation} the {role} {path}; write to another path")
    return target


def _manifest(files: list[str] | None) -> str:
    """What `.qwenmlx.json` holds: files is None while the directory is still being written."""
    return json.dumps({"written_by": "qwenmlx", "pid": os.getpid(), "files": files}, indent=1)


def _is_ours(manifest: object) -> bool:
    return isinstance(manifest, dict) and manifest.get("written_by") == "qwenmlx"


def written_files(directory: Path) -> list[str] | None:
    """The files a finished qwenmlx output lists in its manifest; None without one."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if _is_ours(manifest) else None
    return files if isinstance(files, list) else None


def check_replaceable(target: Path, shown: str | Path | None = None) -> None:
    """Refuse unless target is missing, an empty directory, or a qwenmlx output holding only what qwenmlx wrote."""
    shown = target if shown is None else shown
    if not target.exists():
        return
    if not target.is_dir():
        raise QwenMLXError(f"{shown}: exists and is not a directory; qwenmlx replaces only a directory it wrote")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    files = written_files(target)
    if files is None:
        named = next((name for name in entries if name != MANIFEST), MANIFEST)
        raise QwenMLXError(f"{shown}: not a directory qwenmlx wrote (it holds {named} and no finished {MANIFEST}); "
                           "qwenmlx replaces only its own outputs, even with --force: choose another directory")
    for name in entries:
        path = target / name
        if name != MANIFEST and (name not in files or path.is_symlink() or not path.is_file()):
            raise QwenMLXError(f"{shown}: holds {name}, which qwenmlx did not write; it is never replaced, "
                               "even with --force: move that file out or choose another directory")


def prepare_directory(dst: str | Path, *, inputs: dict[str, Path] | None = None, force: bool = False,
                      on_note: Note = lambda message: None) -> Path:
    """The resolved path a new directory may be written to, or a QwenMLXError saying why not; before any work.

    A non-empty dst needs force, and even then only a qwenmlx output is replaced. Dead writers' leftovers
    beside dst are cleared first (on_note says what was removed or left)."""
    target = check_apart(dst, inputs or {})
    remove_stale_temp_dirs(target.parent, on_note)
    check_replaceable(target, dst)
    if not force and target.is_dir() and any(target.iterdir()):
        raise QwenMLXError(f"{dst}: holds an earlier qwenmlx output (pass --force to replace it)")
    return target


def _lock(file) -> bool | None:
    """Lock an open file for this process: True if locked, False if another process holds it, None if the
    filesystem has no locks."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


@contextmanager
def new_directory(target: Path) -> Iterator[Path]:
    """A hidden sibling of target to write into: renamed to target when the block ends, removed if it raises.

    target comes from prepare_directory. Its manifest lists every file written into the sibling."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    tmp.mkdir()
    try:
        with open(tmp / MANIFEST, "w") as manifest:
            try:  # blocks only while a later run looks at it; a filesystem without locks is written all the same
                fcntl.flock(manifest, fcntl.LOCK_EX)
            except OSError:
                pass
            manifest.write(_manifest(None))
            manifest.flush()
            yield tmp
            manifest.seek(0)
            manifest.truncate()
            manifest.write(_manifest(sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST)))
            manifest.flush()
            move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def move_into_place(tmp: Path, target: Path) -> None:
    """Rename tmp to target; an existing target (empty, or a qwenmlx output) goes only once tmp is complete."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        tmp.rename(target)
        return
    check_replaceable(target)  # again: files may have been put into it while tmp was written
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    with open(target / MANIFEST) as manifest:
        if _lock(manifest) is False:
            raise QwenMLXError(f"{target}: another qwenmlx process is replacing it")
        target.rename(old)  # locked: a later run does not take this copy for a dead writer's
        try:
            tmp.rename(target)
        except BaseException:
            old.rename(target)
            raise
        shutil.rmtree(old)


def remove_stale_temp_dirs(parent: Path, on_note: Note) -> None:
    """Clear what killed qwenmlx writers left in parent: a partial directory is removed; a replaced copy whose
    new version never arrived is put back. A live writer's directories are left alone, and so (with a note)
    is any without a qwenmlx manifest: nothing shows that qwenmlx made it."""
    if not parent.is_dir():
        return
    for path in sorted(parent.iterdir()):
        match = TEMP_DIR.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        try:
            manifest = open(path / MANIFEST)
        except OSError:
            on_note(f"left {path} alone: it has no {MANIFEST}, so it may not be qwenmlx's; "
                    "delete it yourself if nothing is writing it")
            continue
        with manifest:
            locked = _lock(manifest)
            if locked is False:
                continue  # its writer is alive
            try:
                ours = _is_ours(json.loads(manifest.read()))
            except ValueError:
                ours = False
            if locked is None or not ours:
                why = "no file locks here to tell whether" if ours else f"its {MANIFEST} does not say"
                on_note(f"left {path} alone: {why} a qwenmlx process still writes it; "
                        "delete it yourself if nothing is writing it")
                continue
            target = parent / match["name"]
            if match["stage"] == "old" and not target.exists():
                path.rename(target)
                on_note(f"restored {target} from {path.name}: qwenmlx process {match['pid']} ended while replacing it")
            else:
                shutil.rmtree(path)
                on_note(f"removed {path}: left by qwenmlx process {match['pid']}, which ended before finishing")


def mark_written(directory: Path) -> None:
    """Record that qwenmlx (a child process it ran) wrote every file now in directory, so it may replace them later."""
    files = sorted(p.name for p in directory.iterdir() if p.name != MANIFEST)
    (directory / MANIFEST).write_text(_manifest(files))


def remove_output(directory: Path) -> None:
    """Delete a directory qwenmlx wrote (and nothing else: QwenMLXError); nothing to do if it is missing."""
    target = resolve(directory)
    check_replaceable(target, directory)
    if target.exists():
        shutil.rmtree(target)


def check_output_file(path: str | Path, *, inputs: dict[str, Path] | None = None, force: bool = False,
                      if_exists: str = "pass --force to replace it") -> Path:
    """The resolved file an output may be written to, checked before any work: not an input, not a directory,
    in a writable directory; an existing file only with force (if_exists says what to do otherwise)."""
    if resolve(path).is_dir():
        raise QwenMLXError(f"{path}: is a directory; give a file name")
    target = check_apart(path, inputs or {})
    if not target.parent.is_dir():
        raise QwenMLXError(f"{path}: cannot write (no directory {Path(path).parent})")
    if target.exists() and not target.is_file():
        raise QwenMLXError(f"{path}: exists and is not a regular file")
    if target.exists() and not force:
        raise QwenMLXError(f"{path}: exists; {if_exists}")
    try:
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        raise QwenMLXError(f"{path}: cannot write ({e.strerror})") from None
    return target


def write_text_atomically(path: Path, text: str) -> None:
    """Write to a temporary file beside path, then rename it into place: never a half-written file, and
    nothing left behind if writing fails."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise QwenMLXError(f"{path}: cannot write ({e.strerror})") from None
        raise
