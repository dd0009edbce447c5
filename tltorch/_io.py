"""Files replaced atomically: a reader sees the old file or all of the new one, never part of it."""
import contextlib
import os
import secrets
from typing import Callable, Optional, Union


def fsync_dir(path: str) -> None:
    """Make the renames done in folder `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened, and renames are durable anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, Callable[[str], None]],
                 mode: Optional[int] = None) -> None:
    """Write `data` to `path` through a temporary file beside it (`path` + ".tmp-<pid>-<random>"):
    written, fsynced, renamed over `path`, and the rename fsynced. `data` is the bytes, or a function
    that writes the file whose name it is given. `mode`: the file's permission bits, when the default
    (what open() gives under the umask; a writer may leave less) is not wanted. On any error the
    temporary is removed and `path` is untouched."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if callable(data):
            data(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")
