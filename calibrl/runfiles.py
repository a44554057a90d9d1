"""Safe file operations for run directories: names, the ownership marker, atomic writes, appends, repairs.

Rules (the users' data comes first):
- A run or comparison name is one plain path component: never "", ".", "..", absolute, or containing a separator.
- calibrl writes a marker file (`.calibrl`) into every directory it creates for a run or a comparison, before
  anything else. Nothing is ever deleted unless it sits inside a directory that carries the run marker.
- Files that are replaced as a whole (config, checkpoint, summaries) are written to a temporary file in the same
  directory, fsynced, then renamed over the old one (`os.replace`), so a crash or a full disk leaves the old file or
  the new one, never a mix. Appends (history rows) are flushed and fsynced line by line; a line torn by a crash is
  dropped on resume (`repair_jsonl`).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any

MARKER_FILE = ".calibrl"
"""Name of the marker file in every directory calibrl creates (JSON: {"kind": "run" | "comparison"})."""
MARKER_KINDS = ("run", "comparison")


def check_name(name: Any, what: str = "name") -> str:
    """`name` if it is a single plain path component, else ValueError naming `what`."""
    bad = (not isinstance(name, str) or name.strip() in ("", ".", "..") or name != name.strip()
           or any(sep in name for sep in ("/", "\\", os.sep, os.altsep or "/")) or "\0" in name
           or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"))
    if bad:
        raise ValueError(f"{what}: expected a plain directory name (one path component, no '/', '\\', '..' or "
                         f"absolute path), got {name!r}")
    return name


def check_out(out: Any, what: str = "out") -> Path:
    """`out` as a Path if it is (or can be created as) a writable directory; ValueError naming `what` otherwise.
    Writes nothing."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ValueError(f"{what}: expected a directory path, got {out!r}")
    path = Path(out)
    probe = path
    while not probe.exists():  # the first existing ancestor decides
        if probe.parent == probe:
            break
        if probe.is_symlink():  # a dangling link
            raise ValueError(f"{what}: {probe} is a broken symbolic link")
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{what}: {probe} is a file, expected a directory" +
                         ("" if probe == path else f" (needed to create {path})"))
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {probe} is not writable")
    return path


# ------------------------------------------------------------------------------------------------------- marker
def marker_kind(directory: str | os.PathLike) -> str | None:
    """"run" or "comparison" when `directory` carries calibrl's marker, else None."""
    file = Path(directory) / MARKER_FILE
    if Path(directory).is_symlink() or not file.is_file():
        return None
    try:
        kind = json.loads(file.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in MARKER_KINDS else None


def make_marked_dir(directory: str | os.PathLike, kind: str) -> Path:
    """Create `directory` (parents too) and write the marker first; an existing marker of the same kind is kept."""
    if kind not in MARKER_KINDS:
        raise ValueError(f"kind: expected one of {MARKER_KINDS}, got {kind!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if marker_kind(directory) != kind:
        from calibrl import __version__

        atomic_write_text(directory / MARKER_FILE, json.dumps({"kind": kind, "package": "calibrl",
                                                               "version": __version__}) + "\n")
    return directory


def clear_run_dir(directory: str | os.PathLike) -> None:
    """Delete the contents of a run directory calibrl created (the marker is removed last and rewritten by the
    caller). Refuses anything without the run marker, and symbolic links (a link is removed, never followed)."""
    directory = Path(directory)
    if directory.is_symlink():
        raise ValueError(f"run_dir: {directory} is a symbolic link; refusing to delete through it")
    if marker_kind(directory) != "run":
        raise ValueError(f"run_dir: {directory} was not created by calibrl (no {MARKER_FILE} run marker); "
                         f"refusing to delete it: choose another name or remove it yourself")
    for child in directory.iterdir():
        if child.name == MARKER_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ------------------------------------------------------------------------------------------------------- writing
def _write_all(f, data: bytes) -> None:
    """The one place run files hand bytes to the OS (the fault tests patch it to simulate a full disk)."""
    f.write(data)


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power loss (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` by `data` atomically: temporary file in the same directory, fsync, os.replace, fsync of the
    directory. On any error (a full disk) the temporary file is removed and the old file is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """`obj` as indented, sorted JSON, written atomically (summaries, config, markers)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Append text lines (each gets "\\n") and fsync. A crash can only tear the last line, which readers drop."""
    if not lines:
        return
    with open(path, "ab") as f:
        _write_all(f, "".join(line + "\n" for line in lines).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------------------- reading
def split_jsonl(path: str | os.PathLike) -> tuple[list[dict], bytes]:
    """(rows, torn tail) of a JSON-lines file (gzip-compressed when its name ends in .gz). A last line without its
    newline that does not parse is the torn tail (returned, not parsed); a bad line anywhere else raises ValueError
    naming the file and line."""
    path = Path(path)
    if not path.exists():
        return [], b""
    data = path.read_bytes()
    if path.suffix == ".gz":  # a compact shipped file (calibrl.sweep_summary.export_runs): read-only, never appended
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: not a readable gzip file ({err})") from None
    parts = data.split(b"\n")
    tail = parts.pop()  # b"" when the file ends with a newline
    rows = []
    for lineno, raw in enumerate(parts, 1):
        if raw.strip():
            rows.append(_parse_line(path, lineno, raw))
    if tail.strip():
        try:
            rows.append(_parse_line(path, len(parts) + 1, tail))
            tail = b""  # complete but missing its newline: a row, not torn
        except ValueError:
            pass
    return rows, tail if tail.strip() else b""


def _parse_line(path: Path, lineno: int, raw: bytes) -> dict:
    try:
        row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        msg = getattr(err, "msg", None) or type(err).__name__
        raise ValueError(f"{path}:{lineno}: not a valid JSON line ({msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
    return row


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parsed JSON of `path`; ValueError naming the file and line on bad JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: {path} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None


def repair_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of `path` after making it appendable: a torn last line is dropped (warning) and a last line missing its
    newline gets one; the file is rewritten atomically only when something changed. Returns the rows."""
    path = Path(path)
    rows, tail = split_jsonl(path)
    if not path.exists():
        return rows
    data = path.read_bytes()
    if tail:
        warnings.warn(f"{path}: dropped a torn last line ({len(tail)} bytes, a crash mid-write); the step is "
                      f"replayed from the checkpoint", RuntimeWarning, stacklevel=2)
        atomic_write_bytes(path, data[: len(data) - len(tail)])
    elif data and not data.endswith(b"\n"):
        atomic_write_bytes(path, data + b"\n")
    return rows
