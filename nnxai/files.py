"""Files that appear whole or not at all."""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, content: str | Callable[[Path], None]) -> None:
    """Write `path` through a temporary name so that readers never see half a file; `content` is the text, or a
    function that writes the path it is given (a table's `to_csv`, `joblib.dump`).

    The temporary name holds host and process id: shards on several cluster nodes may write the same file at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        if isinstance(content, str):
            temporary.write_text(content)
        else:
            content(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
