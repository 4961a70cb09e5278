"""Files that are never written half: atomic writes and an append-only, resumable JSONL log."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path in `path`'s folder to write to: it replaces `path` when the block ends, and is
    removed if the block raises, so `path` holds either its old content or the complete new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary shareable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temp file in the same folder and `os.replace`."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); fix or delete the file") from err


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the complete records of a JSONL file.

    A torn last line (the process died mid-append) is skipped; a bad line anywhere else is an error.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no trailing newline: an interrupted append
                return
            raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from err


class JsonlLog:
    """Append-only JSONL file keyed by a record field, so a restarted run skips what is done.

    Each append is one `write` of a full line followed by flush+fsync; a torn last line from a
    crash is cut off when the log is reopened, so it is never duplicated or half-read.
    """

    def __init__(self, path: str | os.PathLike, key: str):
        self.path = Path(path)
        self.key = key
        self.records: list[dict] = []
        if self.path.exists():
            self._truncate_torn_tail()
            self.records = list(iter_jsonl(self.path))
        self.done = {self._key_of(r) for r in self.records}

    def _key_of(self, record: dict) -> str:
        if self.key not in record:
            raise ValueError(f"{self.path}: record has no key field {self.key!r}: {record}")
        return str(record[self.key])

    def _truncate_torn_tail(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(cut)

    def __contains__(self, key: object) -> bool:
        return str(key) in self.done

    def __len__(self) -> int:
        return len(self.records)

    def drop(self, unwanted: Callable[[dict], bool]) -> list[dict]:
        """Remove the records `unwanted` picks, from the file (rewritten atomically, the others' lines
        unchanged) and from `done`, so they are made again; returns them."""
        dropped = [record for record in self.records if unwanted(record)]
        if dropped:
            self.records = [record for record in self.records if not unwanted(record)]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode("utf-8"))
            self.done = {self._key_of(r) for r in self.records}
        return dropped

    def append(self, record: dict) -> None:
        key = self._key_of(record)
        if key in self.done:
            raise ValueError(f"{self.path}: record {key!r} is already logged")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)
        self.done.add(key)


def copy_folder(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy the folder `src` to `dest` through a temp folder beside `dest` and renames, so `dest` is either
    its old content or the complete copy (a reader on Drive never sees half a pattern)."""
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder, nothing to copy")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
