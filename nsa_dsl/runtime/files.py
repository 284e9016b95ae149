"""Files the library writes for the user (emitted kernels, pictures): into a folder that can
take them, each written by replacing (a temporary file renamed over the name), so a link at
that name is replaced, never followed, and a reader never sees half a file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from nsa_dsl.errors import SpecError


def output_folder(path: Union[str, os.PathLike], what: str = "--emit") -> Path:
    """``path`` as a folder to write into (made if missing); E640 when it cannot be one."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SpecError("E640", f"{what} {folder}: it exists and is not a folder",
                        hint="name a new or existing folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe", delete=True)
        probe.close()
    except OSError as e:
        raise SpecError("E640", f"{what} {folder}: cannot write there ({e.strerror or e})",
                        hint="name a folder you can write") from None
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(path: Union[str, os.PathLike], data: Union[str, bytes], what: str = "--emit") -> Path:
    """Write ``data`` to ``path`` by replacing whatever is there (a file or a link); E640 on failure."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        # mkstemp makes the file private (0600); a user's output gets the mode open() would give
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        raise SpecError("E640", f"{what}: cannot write {path} ({e.strerror or e})") from None
    return path
