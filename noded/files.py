"""Writing a file so readers see the old content or the new, never a part (a hidden temp, then rename)."""

from __future__ import annotations

import os


def write_atomic(path: str, text: str, mode: int | None = None) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
