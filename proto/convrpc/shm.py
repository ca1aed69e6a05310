"""POSIX shared-memory regions of the co-located data path, shared by server and SDK.

The server never maps a client's region: it copies in and out with ``os.preadv``/``os.pwritev``
(``read_exactly``/``write_all``). A mapping of memory another process controls dies with SIGBUS
the moment that process truncates it, however carefully sizes are checked first; a system call
on the same file returns a short count or an error instead. ``open_region`` also refuses links
and anything but a regular file, so a name can only ever stand for one region of its own.

Regions are opened and mapped directly (shm_open + mmap) rather than through
``multiprocessing.shared_memory.SharedMemory``: before Python 3.13 its resource tracker claims
every segment a process merely attaches to and unlinks it, with a warning, when that process
exits, which would let a server destroy its clients' regions. (The SDK does create its own input
regions with ``SharedMemory``, tracked on purpose: the tracker unlinks them if the client dies.)
Names are given without the leading slash.
"""

from __future__ import annotations

import mmap
import os
import stat

try:  # the C helper behind multiprocessing.shared_memory on POSIX
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

__all__ = [
    "AVAILABLE",
    "attach",
    "create",
    "create_fd",
    "exists",
    "map_region",
    "names_with_prefix",
    "open_region",
    "read_exactly",
    "reserve",
    "unlink",
    "unlinked",
    "write_all",
]

#: Whether this platform has POSIX shared memory.
AVAILABLE = _posixshmem is not None and hasattr(mmap, "MAP_SHARED")
_DEV_SHM = "/dev/shm"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _open(name: str, flags: int, mode: int = 0o600) -> int:
    if not AVAILABLE:
        raise FileNotFoundError(f"shared memory is not available on this platform ({name})")
    return _posixshmem.shm_open("/" + name, flags, mode)


def reserve(fd: int, size: int) -> None:
    """Give a region its pages now. Writing to a page a full /dev/shm cannot supply (Docker's default
    is 64 MiB) kills the process with SIGBUS; reserving turns that into an OSError (ENOSPC) here."""
    os.ftruncate(fd, size)
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)


def create_fd(name: str, size: int) -> int:
    """A file descriptor of a new region of ``size`` bytes, reserved, readable and writable by this user only.

    FileExistsError if the name is taken, OSError if /dev/shm has no room. The caller owns the name
    and must ``unlink`` it, and closes the descriptor.
    """
    fd = _open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR)
    try:
        reserve(fd, size)
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    return fd


def create(name: str, size: int) -> mmap.mmap:
    """A new region (as ``create_fd``) mapped read-write."""
    fd = create_fd(name, size)
    try:
        return mmap.mmap(fd, size)
    except BaseException:
        unlink(name)
        raise
    finally:
        os.close(fd)


def open_region(name: str, *, writable: bool, same_user: bool = True) -> int:
    """A file descriptor of an existing region (the caller closes it).

    FileNotFoundError if it does not exist; PermissionError if it belongs to another user while
    ``same_user``, is a link (a symbolic one, or a name hard-linked to another region: ``st_nlink``
    is 1 for a region and its one name) or is not a regular file (a FIFO or a directory in
    /dev/shm; opened non-blocking, so a FIFO cannot hang the caller); ValueError if it is empty.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = _open(name, flags)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise PermissionError(f"shared-memory region {name} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PermissionError(f"shared-memory region {name} is not a regular file")
        if info.st_nlink != 1:
            raise PermissionError(f"shared-memory region {name} has {info.st_nlink} names (a hard link)")
        if same_user and info.st_uid != os.getuid():
            raise PermissionError(f"shared-memory region {name} belongs to another user")
        if info.st_size == 0:
            raise ValueError(f"shared-memory region {name} is empty")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_exactly(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill ``buffer`` from ``offset`` of the region; returns the bytes read, fewer than asked only
    when the region ends sooner (its owner shrank it)."""
    buffer = memoryview(buffer).cast("B")
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def write_all(fd: int, buffer: memoryview, offset: int) -> None:
    """Write all of ``buffer`` at ``offset`` of the region (OSError, e.g. ENOSPC, if /dev/shm is full)."""
    buffer = memoryview(buffer).cast("B")
    done = 0
    while done < len(buffer):
        done += os.pwritev(fd, [buffer[done:]], offset + done)


def map_region(fd: int, *, writable: bool, populate: bool = False) -> mmap.mmap:
    """Map a whole region; ``populate`` pre-faults its pages in one system call."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
    return mmap.mmap(fd, os.fstat(fd).st_size, flags=flags, prot=prot)


def attach(name: str, *, writable: bool, populate: bool = False, same_user: bool = True) -> mmap.mmap:
    """Map an existing region whole (read-only unless ``writable``); the name stays as it is."""
    fd = open_region(name, writable=writable, same_user=same_user)
    try:
        return map_region(fd, writable=writable, populate=populate)
    finally:
        os.close(fd)


def unlinked(fd: int) -> bool:
    """Whether the region behind ``fd`` has lost its name (its owner unlinked it)."""
    return os.fstat(fd).st_nlink == 0


def unlink(name: str) -> bool:
    """Remove the name (mappings stay valid until unmapped); False if it was already gone."""
    if not AVAILABLE:
        return False
    try:
        _posixshmem.shm_unlink("/" + name)
        return True
    except FileNotFoundError:
        return False


def exists(name: str) -> bool:
    try:
        os.close(_open(name, os.O_RDONLY))
    except FileNotFoundError:
        return False
    except PermissionError:
        pass
    return True


def names_with_prefix(prefix: str) -> list[str]:
    """Existing region names starting with ``prefix`` (Linux lists them in /dev/shm; elsewhere none)."""
    try:
        return sorted(n for n in os.listdir(_DEV_SHM) if n.startswith(prefix))
    except OSError:
        return []
