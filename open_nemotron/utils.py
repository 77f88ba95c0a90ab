"""Small shared helpers: atomic file writes, line-numbered jsonl reading."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def jsonl_rows(path: Path, error: type[Exception]) -> Iterator[tuple[str, Any]]:
    """``("PATH:LINE", row)`` for every non-blank line of a jsonl file; a line that is not JSON raises `error`
    naming the file and line."""
    import json

    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise error(f"{where}: not valid JSON ({err.msg})") from None


def write_result(json_path: str | Path, result: dict, markdown: str) -> None:
    """A stage's machine-readable result (JSON) and, beside it with suffix .md, the human-readable one."""
    import json

    json_path = Path(json_path)
    atomic_write_text(json_path, json.dumps(result, indent=2))
    atomic_write_text(json_path.with_suffix(".md"), markdown)


class atomic_path:  # noqa: N801 - used like a function: `with atomic_path(p) as tmp: save(tmp)`
    """A temporary path beside `path`, renamed onto it when the block ends without error (for writers that want
    a file name, such as safetensors' `save_file`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            os.chmod(self.tmp, 0o644)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
