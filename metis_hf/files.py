"""Small file helpers: everything metis-hf writes goes through a temporary name first."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from metis_hf.redact import redact_data, redact_known, redact_text


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text``, tokens redacted (``metis_hf.redact``), to ``path`` via a temporary sibling,
    so a reader never sees half a file."""
    _write_atomic(Path(path), redact_text(text))


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON, secret-named keys' values and known tokens redacted."""
    _write_atomic(Path(path), redact_known(json.dumps(redact_data(data), indent=2) + "\n"))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an earlier ``target`` only now
    that the new one is complete."""
    tmp, target = Path(tmp), Path(target)
    os.chmod(tmp, 0o755)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
