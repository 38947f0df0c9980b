"""Compiling ``csrc/bilinear.c`` and caching the shared object, for :mod:`.native`.

The library is cached under :func:`shiftlab.config.cache_dir` (else ``$TMPDIR/shiftlab-<uid>``),
keyed by the source, the compiler, its flags and the CPU, and only in a directory owned by this
user that group and others cannot write. A cached file is checked *before* it is loaded, since a
damaged one is not an error that dlopen reports: a truncated library dies of SIGBUS inside the
loader when it maps the missing pages. A library is loaded only when it is a regular file (not a
link), owned by this user, not writable by group or others, and its size and SHA-256 match the
sidecar ``<library>.sha256`` written after it was built; anything else is compiled again, into a
temporary name that then replaces it (``os.replace``: concurrent processes never see a partial
file).

A compiler still running after :data:`COMPILE_SECONDS` is killed (its whole process group: no
orphaned ``cc1`` keeps a core busy) and remembered in a marker file
``bilinear-<key>.timeout`` next to the libraries, keyed by the source and the compiler: later
processes do not run it again, and fall back to the eager code at once. Deleting the marker (or
the cache directory) tries again.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from ... import config
from ...errors import one_line

SOURCE = Path(__file__).with_name("csrc") / "bilinear.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=gnu99", "-shared", "-fPIC")
# a compiler that does not know this CPU (no -march=native); no OpenMP runtime (Apple clang): one
# thread per call, several calls on Python threads; neither
FALLBACKS = (FLAGS, tuple(flag for flag in FLAGS if flag != "-march=native"),
             tuple("-fopenmp-simd" if flag == "-fopenmp" else flag for flag in FLAGS),
             tuple("-fopenmp-simd" if flag == "-fopenmp" else flag for flag in FLAGS
                   if flag != "-march=native"))
COMPILE_SECONDS = 120
"""A compiler still running after this long is killed and not run again on this source (see
the module's docstring)."""
MAX_LIBRARY_BYTES = 64 << 20
"""A cached file larger than this is not read (the library is ~100 KB)."""
_POSIX = hasattr(os, "getuid")


class GaveUp(OSError):
    """The compiler ran too long, now or in an earlier process: it is not run again."""


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    lines.append(line.strip())
                    if len(lines) >= 3:
                        break
    except OSError:
        pass
    return "\n".join([platform.machine(), platform.processor(), *lines])


def _user() -> str:
    return str(os.getuid()) if _POSIX else os.environ.get("USERNAME", "user")


def _not_private(directory: Path) -> Optional[str]:
    """Why a library there could be somebody else's, or None: only a directory owned by this
    user and not writable by group or others may hold what is loaded (a shared /tmp must not
    serve another user's .so)."""
    if not _POSIX:
        return None
    info = directory.stat()
    if info.st_uid != os.getuid():
        return f"{directory} belongs to another user: not used"
    if info.st_mode & 0o022:
        return f"{directory} is writable by other users: not used"
    return None


def compiler() -> Optional[str]:
    """``$CC``, else ``cc``, ``gcc`` or ``clang``: the first found, as a path."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _directories() -> list[Path]:
    return [config.cache_dir(), Path(tempfile.gettempdir()) / f"shiftlab-{_user()}"]


def _existing_private() -> Iterator[Path]:
    """The cache directories that exist and are private (nothing is created to look)."""
    for directory in _directories():
        try:
            if directory.is_dir() and _not_private(directory) is None:
                yield directory
        except OSError:
            continue


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar(library: Path) -> Path:
    """Where the size and hash of ``library`` are recorded."""
    return library.with_name(library.name + ".sha256")


def _read_own(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, read through one descriptor after checking it (OSError naming the
    problem): a regular file, not a link, owned by this user, not writable by group or others,
    at most ``limit`` bytes."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        if _POSIX and info.st_uid != os.getuid():
            raise OSError(f"{path} belongs to another user")
        if _POSIX and info.st_mode & 0o022:
            raise OSError(f"{path} is writable by other users")
        if info.st_size > limit:
            raise OSError(f"{path} is larger than {limit} bytes")
        with os.fdopen(os.dup(descriptor), "rb") as stream:
            return stream.read(limit + 1)
    finally:
        os.close(descriptor)


def problem(library: Path, source_digest: str) -> Optional[str]:
    """Why the cached ``library`` must not be loaded (it is then built again), or None: checked
    before dlopen, which cannot report a truncated file (see the module's docstring). Between
    this check and the load only this user can change the file: the directory is private."""
    try:
        data = _read_own(library, MAX_LIBRARY_BYTES)
        recorded = _read_own(sidecar(library), 4096).decode("ascii", "replace").split()
    except OSError as exc:  # also: no sidecar (a build that did not finish, an older shiftlab)
        return one_line(exc)
    if recorded[:3] != [_digest(data), str(len(data)), source_digest]:
        return f"{library} does not match {sidecar(library).name} (damaged or partly written)"
    return None


def _marker(directory: Path, compiler_path: str, source: bytes) -> Path:
    key = _digest(b"\0".join([source, compiler_path.encode()]))[:20]
    return directory / f"bilinear-{key}.timeout"


def _kill(process: subprocess.Popen) -> None:
    """Kill ``process`` and its children (the compiler driver's cc1, ld...): killing the driver
    alone would leave them running, holding the output pipes."""
    try:
        if _POSIX:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except OSError:
        process.kill()
    try:
        process.communicate(timeout=10)
    except subprocess.TimeoutExpired:  # a child that left the group: do not wait for it
        pass


def _compile(command: list[str]) -> tuple[int, str]:
    """Run the compiler in a process group of its own: (exit code, stderr); TimeoutExpired
    after :data:`COMPILE_SECONDS`, with every process of the group killed."""
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=_POSIX)
    try:
        _, errors = process.communicate(timeout=COMPILE_SECONDS)
    except BaseException:  # the time limit, or Ctrl-C: no compiler left running
        _kill(process)
        raise
    return process.returncode, errors


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    handle, partial = tempfile.mkstemp(suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(partial, mode)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _gave_up(directory: Path, compiler_path: str, source: bytes) -> GaveUp:
    """Remember a compiler that ran too long (a marker file), and the error that says so."""
    marker = _marker(directory, compiler_path, source)
    note = (f"{compiler_path} ran longer than {COMPILE_SECONDS} s compiling {SOURCE} (sha256 "
            f"{_digest(source)}); shiftlab does not run it on this source again: delete this "
            "file to retry\n")
    try:
        _write_atomically(marker, note.encode(), 0o644)
        retry = f"delete {marker} to try again"
    except OSError:
        retry = "not tried again in this process"
    return GaveUp(f"{compiler_path} ran longer than {COMPILE_SECONDS} s ({retry})")


def build(compiler_path: str, rebuild: bool = False) -> Path:
    """The path of the compiled library: a cached one that passes :func:`problem`, else compiled
    now (``rebuild``: compile even if the cached file looks sound, e.g. when it would not load).
    OSError when it cannot be built; :class:`GaveUp` when the compiler ran too long, now or
    before (a marker file)."""
    source = SOURCE.read_bytes()
    source_digest = _digest(source)
    keys = [(flags, _digest(b"\0".join([source, compiler_path.encode(), " ".join(flags).encode(),
                                        _cpu_signature().encode()]))[:20])
            for flags in FALLBACKS]
    if not rebuild:
        for _, key in keys:
            for directory in _existing_private():
                target = directory / f"bilinear-{key}.so"
                if os.path.lexists(target) and problem(target, source_digest) is None:
                    return target
    for directory in _existing_private():
        marker = _marker(directory, compiler_path, source)
        if os.path.lexists(marker):
            raise GaveUp(f"{compiler_path} ran too long in an earlier build; delete {marker} "
                         "to try again")
    errors = []
    for flags, key in keys:
        for directory in _directories():
            target = directory / f"bilinear-{key}.so"
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                refused = _not_private(directory)
                if refused:
                    errors.append(refused)
                    continue
                handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
                os.close(handle)
            except OSError as exc:
                errors.append(one_line(exc))
                continue
            try:
                code, stderr = _compile([compiler_path, *flags, str(SOURCE), "-o", partial])
                if code == 0:
                    os.chmod(partial, 0o755)  # not the umask's: a writable file is refused
                    with open(partial, "rb") as built:  # on disk before it is visible
                        data = built.read()
                        os.fsync(built.fileno())
                    os.replace(partial, target)  # atomic: concurrent ranks may race here
                    _write_atomically(sidecar(target), f"{_digest(data)} {len(data)} "
                                      f"{source_digest}\n".encode(), 0o644)
                    return target
                lines = [line for line in stderr.splitlines() if "error" in line]
                errors.append(one_line((lines or [stderr])[0] or f"exit {code}"))
                break  # the flags, not the directory: try the next flags
            except subprocess.TimeoutExpired:
                raise _gave_up(directory, compiler_path, source) from None
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(one_line(exc))
            finally:
                if os.path.exists(partial):
                    os.remove(partial)
    raise OSError("; ".join(errors) or "no writable cache directory")
