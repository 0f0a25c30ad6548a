"""Run one function on untrusted input in a separate, confined child process.

segstudio never runs code from a model file in its own process.  Where a
format can only be read by running its code (TorchScript), or where reading
a file could hang or exhaust the machine (an ONNX trial run), the work is
done by :func:`run_confined` in a fresh Python child process and only the
files it was asked for come back; the caller then validates them as it
validates any untrusted file.

What the child gets, on every platform:

* a clean environment (no inherited variables but a fixed ``PATH`` and
  ``LANG``), a temporary empty ``HOME``, ``TMPDIR`` and working directory, and
  ``python -I`` (no user site, no ``PYTHON*`` variables, no current directory
  on ``sys.path``);
* the input files as read-only copies in a folder of their own;
* a wall-clock timeout (the whole process group is killed);
* only the named files of its output folder come back (regular files, size
  checked); the rest of its folder is deleted.

On Linux, in addition (each reported back in :attr:`ConfinedResult.applied`):

* resource limits: address space, CPU seconds, file size, open files, no core
  dumps;
* ``PR_SET_NO_NEW_PRIVS`` and a seccomp filter that makes ``fork``,
  ``vfork``, ``execve``, ``execveat`` and ``clone`` without ``CLONE_THREAD``
  fail (threads still work): the child cannot start other programs
  (x86_64 and aarch64);
* Landlock (kernel 5.13+): the file system is read-only on what Python
  needs (the interpreter, its libraries, segstudio's package, shared
  libraries) and on the input copies, read-write only on the child's own
  folders, nothing else; with Landlock ABI 4+ TCP ``bind`` / ``connect`` are
  denied, with ABI 6+ abstract Unix sockets and signals to processes outside
  the child are too;
* a sandbox, the first that works of (``method``):

  ``bwrap``  bubblewrap (Debian / Ubuntu package ``bubblewrap``): new user,
             PID, network, IPC, UTS and cgroup namespaces; a file system that
             holds only the read-only system and Python folders, the input
             copies, a private ``/tmp``, ``/proc`` and ``/dev``; all
             capabilities dropped; dies with its parent;
  ``unshare`` new user, network and IPC namespaces made by the child itself
             (``unshare(2)``, as ``unshare -rn`` does): no network; the file
             system is confined by Landlock alone;
  ``plain``  none of the above is possible: the limits and Landlock only.

On macOS and Windows the child is an ordinary subprocess with the clean
environment, temporary folders, read-only input copies and the timeout;
macOS adds the resource limits; there is no file-system or network
sandbox.  :func:`describe_confinement` says which applies here, in words.

The sandbox can be chosen with ``method=`` or the ``SEGSTUDIO_SANDBOX``
environment variable (``auto``, ``bwrap``, ``unshare``, ``plain``); a method
that is asked for and cannot run here is an error, never a silent downgrade.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import json
import os
import platform
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import IncompatibleArtifactError, InputError

METHODS = ("bwrap", "unshare", "plain")
RESULT_NAME = "result.json"
MAX_RESULT_BYTES = 1 << 20
# only functions of segstudio's own modules may be run in a child
TARGET_PREFIX = "segstudio."


@dataclass(frozen=True)
class Limits:
    """Resource limits of a confined child.

    ``memory_bytes`` caps the address space (``RLIMIT_AS``, which counts
    reserved as well as used memory), ``cpu_seconds`` the CPU time of all
    its threads, ``file_bytes`` the size of any file it writes and of every
    file that comes back, ``open_files`` its file descriptors;
    ``wall_seconds`` is the timeout after which it is killed.
    """

    memory_bytes: int = 4 << 30
    cpu_seconds: int = 600
    wall_seconds: float = 300.0
    file_bytes: int = 2 << 30
    open_files: int = 512


@dataclass
class ConfinedResult:
    """What a confined run gave back.

    ``value``: the function's JSON return value (untrusted: check it);
    ``files``: the named output files, moved to the destination folder;
    ``method``: the sandbox used; ``applied``: what the child reports it
    applied (``landlock`` ABI or 0, ``seccomp``, ``no_new_privs``,
    ``own_network`` (a network namespace of its own), ``rlimits``);
    ``pid``: the child's process id as this process sees it, ``child_pid``
    as the child saw it; ``seconds``: wall time.
    """

    value: Any
    files: dict[str, Path]
    method: str
    applied: dict
    pid: int
    child_pid: int
    seconds: float
    log: str = ""
    memory: dict = field(default_factory=dict)  # the child's peak address space and resident bytes


class ConfinedRunError(IncompatibleArtifactError):
    """The confined child failed, was killed for a limit, or gave back something unusable."""


# ----------------------------------------------------------------------------- what can run here


def requested_method(method: str | None = None) -> str:
    """``method``, else ``$SEGSTUDIO_SANDBOX``, else ``auto`` (checked).

    Parameters
    ----------
    method : str, optional
        ``"auto"``, ``"bwrap"``, ``"unshare"`` or ``"plain"`` (any case,
        surrounding spaces ignored); None or empty: the environment variable.

    Returns
    -------
    str
        The method, in lower case; whether it can run here is not checked
        (:func:`choose_method` does).

    Raises
    ------
    InputError
        Not one of the four.
    """
    method = (method or os.environ.get("SEGSTUDIO_SANDBOX") or "auto").strip().lower()
    if method not in ("auto", *METHODS):
        raise InputError(f"unknown sandbox {method!r}", hint=f"SEGSTUDIO_SANDBOX is one of auto, {', '.join(METHODS)}")
    return method


@lru_cache(maxsize=1)
def _bwrap_works() -> bool:
    exe = shutil.which("bwrap")
    if exe is None or not sys.platform.startswith("linux"):
        return False
    try:
        done = subprocess.run([exe, "--ro-bind", "/", "/", "--unshare-all", "--die-with-parent", "--", "/bin/true"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@lru_cache(maxsize=1)
def _unshare_works() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    code = ("import ctypes,sys;libc=ctypes.CDLL(None,use_errno=True);"
            f"sys.exit(0 if libc.unshare({CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC})==0 else 1)")
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=20, env=_clean_env(Path(tempfile.gettempdir())), check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def available_methods() -> list[str]:
    """The sandboxes that can run here, strongest first (``plain`` always can).

    Returns
    -------
    list of str
        ``"bwrap"`` when ``bwrap`` is on the ``PATH`` and a test sandbox runs,
        ``"unshare"`` when a child process can create user, network and IPC
        namespaces (Linux only; each tried once per process), then ``"plain"``.
    """
    out = []
    if _bwrap_works():
        out.append("bwrap")
    if _unshare_works():
        out.append("unshare")
    return out + ["plain"]


def choose_method(method: str | None = None) -> str:
    """The sandbox a run would use: the strongest available for ``auto``, else the one asked for.

    Parameters
    ----------
    method : str, optional
        As for :func:`requested_method` (None: ``$SEGSTUDIO_SANDBOX``, else
        ``auto``).

    Returns
    -------
    str
        ``"bwrap"``, ``"unshare"`` or ``"plain"``.

    Raises
    ------
    InputError
        An unknown method, or one asked for that cannot run here (never a
        silent downgrade).
    """
    asked = requested_method(method)
    available = available_methods()
    if asked == "auto":
        return available[0]
    if asked not in available:
        why = {"bwrap": "bubblewrap (bwrap) is not installed or cannot create namespaces here",
               "unshare": "this system does not let unprivileged processes create user namespaces"}.get(asked, "")
        raise InputError(f"the {asked} sandbox cannot run here: {why}",
                         hint=f"available here: {', '.join(available)}; or leave SEGSTUDIO_SANDBOX unset")
    return asked


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none).

    Returns
    -------
    int
        0 also off Linux, on a CPU other than x86_64 / aarch64, or when the
        kernel refuses the call.
    """
    nr = _SYSCALLS.get(platform.machine(), {}).get("landlock_create_ruleset")
    if nr is None or not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(nr), None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(abi))


def describe_confinement(method: str | None = None) -> str:
    """One sentence: the confinement a child gets on this machine.

    Parameters
    ----------
    method : str, optional
        The sandbox asked for, as for :func:`choose_method` (not looked at on
        macOS and Windows).

    Returns
    -------
    str
        The platform, then the sandbox, Landlock ABI, process blocking,
        limits and timeout that apply, in words.

    Raises
    ------
    InputError
        Outside macOS and Windows, as :func:`choose_method`.
    """
    if sys.platform == "darwin":
        return ("macOS: a separate process with resource limits, a clean environment, temporary folders and a "
                "timeout; no file-system or network sandbox")
    if sys.platform.startswith("win"):
        return ("Windows: a separate process with a clean environment, temporary folders and a timeout; "
                "no resource limits and no file-system or network sandbox")
    chosen = choose_method(method)
    abi = landlock_abi()
    parts = {"bwrap": "bubblewrap sandbox (own user, PID and network namespaces, only system and Python folders "
                      "visible, read-only)",
             "unshare": "own user and network namespaces (no network)",
             "plain": "no namespaces (neither bubblewrap nor user namespaces are available)"}[chosen]
    fs = (f"Landlock ABI {abi} (files read-only except its own folder"
          + (", no TCP" if abi >= 4 else "") + ")") if abi else "no Landlock (kernel too old)"
    seccomp = "no new processes" if platform.machine() in _SECCOMP else "new processes not blocked on this CPU"
    return f"Linux: a separate process in a {parts}, {fs}, {seccomp}, resource limits and a timeout"


# ----------------------------------------------------------------------------- the parent's side


def _clean_env(work: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(work / "home"),
            "TMPDIR": str(work / "tmp"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def _python_paths() -> list[Path]:
    """Folders the child's Python needs to read: the interpreter, its libraries, segstudio's package."""
    package = Path(__file__).resolve().parents[2]  # segstudio/ (core/models/confine.py)
    # not sys.path as a whole: it may hold the current folder or a test runner's root
    paths = {Path(sys.base_prefix), Path(sys.prefix), Path(os.path.realpath(sys.executable)).parent.parent,
             package}
    # keep the outermost folders only
    resolved = sorted({p.resolve() for p in paths if p.exists()}, key=lambda p: len(p.parts))
    out: list[Path] = []
    for p in resolved:
        if not any(p == q or q in p.parents for q in out):
            out.append(p)
    return out


SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/ld.so.conf",
               "/etc/ld.so.conf.d", "/etc/localtime", "/sys/devices/system/cpu")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


def _read_paths() -> list[str]:
    out = [p for p in SYSTEM_READ if os.path.exists(p)]
    for p in _python_paths():
        if not any(str(p) == s or str(p).startswith(s + "/") for s in out):
            out.append(str(p))
    return out


def _bwrap_command(work: Path, read_paths: list[str]) -> list[str]:
    cmd = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--unshare-all",
           "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for p in read_paths:
        if os.path.islink(p) and p.count("/") == 1:  # merged /usr: /lib -> usr/lib
            cmd += ["--symlink", os.readlink(p), p]
        else:
            cmd += ["--ro-bind", p, p]
    cmd += ["--bind", str(work), str(work), "--ro-bind", str(work / "in"), str(work / "in"),
            "--ro-bind", str(work / "job.json"), str(work / "job.json"), "--chdir", str(work / "cwd"), "--"]
    return cmd


def run_confined(
    target: str,
    *,
    args: dict | None = None,
    inputs: dict[str, Path] | None = None,
    outputs: tuple[str, ...] = (),
    dest: str | Path | None = None,
    limits: Limits = Limits(),
    method: str | None = None,
    label: str = "the model",
) -> ConfinedResult:
    """Run ``target`` (``"segstudio.module:function"``) in a confined child; see the module docstring.

    The function is called in the child as ``function(inputs, out_dir, **args)``
    with ``inputs`` mapping each name to its read-only copy and ``out_dir``
    the only folder it may write to; it returns a JSON value.  ``outputs``
    names the files of ``out_dir`` that come back, moved into ``dest``
    (required when ``outputs`` is not empty).  Any failure, timeout or limit
    raises :class:`ConfinedRunError` whose message starts with ``label``.
    The temporary work folder is removed in every case.

    Parameters
    ----------
    target : str
        ``"module:function"``; the module must start with ``segstudio.``.
    args : dict, optional
        Keyword arguments of the function (JSON values).
    inputs : dict of str to pathlib.Path, optional
        Name (a relative path without ``.`` or ``..``) -> file; each is copied
        read-only under the child's ``in`` folder.
    outputs : tuple of str
        Names of files in ``out_dir`` to bring back; each must be a regular
        file (not a link) of at most ``limits.file_bytes``.
    dest : str or pathlib.Path, optional
        The folder (created if needed) the outputs are copied into.
    limits : Limits
        Address space, CPU seconds, file size, open files and wall-clock
        timeout (default: 4 GiB, 600 s, 2 GiB, 512, 300 s).
    method : str, optional
        The sandbox, as for :func:`choose_method`.
    label : str
        What is run, in words: the start of every error message.

    Returns
    -------
    ConfinedResult
        The function's JSON value (untrusted), the outputs (name -> path in
        ``dest``), the sandbox, what the child applied, pids, time, the tail
        of its log (at most 4000 bytes) and its peak memory.

    Raises
    ------
    ConfinedRunError
        The child ran past ``limits.wall_seconds`` (its process group is
        killed), died or ended without a result, its function raised, its
        result is not a regular file of at most :data:`MAX_RESULT_BYTES`
        (1 MiB) holding a JSON mapping, or an output is missing, not a
        regular file, or larger than ``limits.file_bytes``.
    InputError
        The sandbox asked for is unknown or cannot run here.
    ValueError
        ``target`` outside segstudio, ``outputs`` without ``dest``, or a bad
        input name.
    """
    module, _, func = target.partition(":")
    if not module.startswith(TARGET_PREFIX) or not func:
        raise ValueError(f"not a segstudio function: {target!r}")
    if outputs and dest is None:
        raise ValueError("dest is required with outputs")
    chosen = choose_method(method)
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="segstudio-confine-"))
    try:
        copies = _stage_inputs(work, inputs or {})
        read_paths = _write_job(work, target, args or {}, copies, limits, chosen)
        python = [sys.executable, "-I", "-B", "-m", __name__, str(work / "job.json")]
        cmd = (_bwrap_command(work, read_paths) if chosen == "bwrap" else []) + python
        log_path = work / "child.log"
        rc, pid = _spawn(cmd, work, log_path, limits, label)
        log_text = _tail(log_path)
        result = _checked_result(work, rc, log_text, limits, label)
        files = {}
        if outputs:
            dest = Path(dest)
            dest.mkdir(parents=True, exist_ok=True)
            for name in outputs:
                files[name] = _take_output(work / "out", name, dest, limits, label)
        applied = result.get("applied") if isinstance(result.get("applied"), dict) else {}
        return ConfinedResult(value=result.get("value"), files=files, method=chosen, applied=applied, pid=pid,
                              child_pid=int(result.get("pid") or 0), seconds=time.perf_counter() - t0, log=log_text,
                              memory=result.get("memory") if isinstance(result.get("memory"), dict) else {})
    finally:
        _remove(work)


def _write_job(work: Path, target: str, args: dict, copies: dict[str, str], limits: Limits, method: str) -> list[str]:
    """``work/job.json``: what the child runs, what it may read and write, its limits; returns the read paths."""
    read_paths = _read_paths()
    job = {"target": target, "args": args, "inputs": copies, "out": str(work / "out"),
           "write": [str(work / d) for d in ("out", "home", "tmp", "cwd")], "read": read_paths,
           "read_only": [str(work / "in")], "limits": asdict(limits), "unshare": method == "unshare",
           "parent_netns": _netns()}
    (work / "job.json").write_text(json.dumps(job))
    return read_paths


def _stage_inputs(work: Path, inputs: dict[str, Path]) -> dict[str, str]:
    """The work folders, and read-only copies of ``inputs`` under ``work/in`` (name -> copy's path)."""
    for sub in ("in", "out", "home", "tmp", "cwd"):
        (work / sub).mkdir(mode=0o700)
    copies = {}
    for name, src in inputs.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or any(p in ("..", ".") for p in parts):
            raise ValueError(f"bad input name {name!r}")
        dst = work / "in" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o444)
        copies[name] = str(dst)
    for root, dirs, _ in os.walk(work / "in", topdown=False):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o555)
    os.chmod(work / "in", 0o555)
    return copies


def _spawn(cmd: list[str], work: Path, log_path: Path, limits: Limits, label: str) -> tuple[int, int]:
    """Run the child to its end (killed with its whole group at the time limit); its exit status and pid."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=work / "cwd", env=_clean_env(work), close_fds=True,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ConfinedRunError(
                f"{label}: stopped after {limits.wall_seconds:g} s (the time limit of a confined run)",
                hint="the model may loop forever; if it is just slow, convert it to ONNX yourself") from None
        finally:
            _kill_group(proc)  # nothing of the child outlives it
    return rc, proc.pid


def _checked_result(work: Path, rc: int, log_text: str, limits: Limits, label: str) -> dict:
    """The child's result record; :class:`ConfinedRunError` when it died or its function failed."""
    result = _read_result(work / "out" / RESULT_NAME, label)
    if result is None:
        raise ConfinedRunError(f"{label}: {_death(rc, limits)}" + (f" ({_last_line(log_text)})" if log_text else ""))
    if not result.get("ok"):
        message = _one_line(str(result.get("error", "failed")).replace(str(work / "in") + os.sep, ""))
        if re.search(r"alloc|MemoryError|out of memory", message, re.IGNORECASE):
            message += f" (a confined run may use at most {limits.memory_bytes / (1 << 30):.1f} GiB)"
        raise ConfinedRunError(f"{label}: {message}")
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: all it started goes too
        elif proc.poll() is None:
            proc.kill()
    except OSError:  # gone already
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _remove(work: Path) -> None:
    for root, dirs, _ in os.walk(work):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    try:
        os.chmod(work, 0o700)
    except OSError:
        pass
    shutil.rmtree(work, ignore_errors=True)


def _netns() -> int:
    try:
        return os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return 0


def _tail(path: Path, n: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _one_line(text: str, n: int = 400) -> str:
    line = " ".join(text.split())
    return line if len(line) <= n else line[: n - 3] + "..."


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return _one_line(lines[-1] if lines else "", 200)


def _death(rc: int, limits: Limits) -> str:
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return f"used more than its {limits.cpu_seconds} CPU seconds and was stopped"
        if sig == signal.SIGXFSZ:
            return f"tried to write a file larger than {limits.file_bytes >> 20} MiB and was stopped"
        if sig in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            return (f"the confined process died ({signal.Signals(sig).name}), possibly out of its "
                    f"{limits.memory_bytes / (1 << 30):.1f} GiB memory limit")
        return f"the confined process died ({signal.Signals(sig).name})"
    return f"the confined process ended (exit code {rc}) without a result"


def _read_result(path: Path, label: str) -> dict | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_RESULT_BYTES:
        raise ConfinedRunError(f"{label}: the confined process gave back an unusable result")
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfinedRunError(f"{label}: the confined process gave back an unreadable result") from None
    if not isinstance(result, dict):
        raise ConfinedRunError(f"{label}: the confined process gave back an unusable result")
    return result


def _take_output(out: Path, name: str, dest: Path, limits: Limits, label: str) -> Path:
    src = out / name
    try:
        st = os.lstat(src)
    except OSError:
        raise ConfinedRunError(f"{label}: the confined process did not write {name}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfinedRunError(f"{label}: the confined process gave back {name} as something other than a file")
    if st.st_size > limits.file_bytes:
        raise ConfinedRunError(f"{label}: the confined process wrote {name} of {st.st_size} bytes "
                               f"(limit {limits.file_bytes})")
    target = dest / name
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f, open(target, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
    return target


# ----------------------------------------------------------------------------- the child's side

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x40000000
CLONE_THREAD = 0x00010000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2

LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# file-system rights by ABI version
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

_SYSCALLS = {  # the same numbers on every architecture with the generic table
    "x86_64": {"landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446},
    "aarch64": {"landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446},
}
_SECCOMP = {  # audit arch, then the calls that start a process (clone is allowed for threads)
    "x86_64": {"arch": 0xC000003E, "deny": (57, 58, 59, 322), "clone": 56, "clone3": 435, "x32": True},
    "aarch64": {"arch": 0xC00000B7, "deny": (221, 281), "clone": 220, "clone3": 435, "x32": False},
}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def apply_landlock(read: list[str], write: list[str], devices: tuple[str, ...] = DEVICES) -> int:
    """Restrict this process (and its threads and children) with Landlock; returns the ABI used (0: none).

    ``read``: paths readable (and executable); ``write``: folders fully
    usable (no device nodes); ``devices``: character devices read-write;
    everything else on the file system is denied, and with ABI >= 4 TCP
    bind / connect, with ABI >= 6 abstract Unix sockets and signals out.
    Threads already running are not restricted: call before starting any
    that run untrusted work.  A path that cannot be opened is skipped; a
    path that is not a folder gets file rights only.  Sets
    ``PR_SET_NO_NEW_PRIVS`` on the way.

    Parameters
    ----------
    read : list of str
        Paths (and, for folders, everything beneath) that may be read,
        listed and executed.
    write : list of str
        Folders beneath which every handled right is granted (create, write,
        remove, rename, truncate) except making character or block devices
        and device ioctls.
    devices : tuple of str
        Files that may be opened for reading and writing (default
        :data:`DEVICES`: ``/dev/null``, ``/dev/zero``, ``/dev/urandom``,
        ``/dev/random``).

    Returns
    -------
    int
        The Landlock ABI applied; 0 when the kernel has none (then nothing
        is restricted).

    Raises
    ------
    OSError
        A Landlock call or ``prctl(PR_SET_NO_NEW_PRIVS)`` failed.
    """
    abi = landlock_abi()
    if abi <= 0:
        return 0
    nr = _SYSCALLS[platform.machine()]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    handled = _fs_rights(abi)
    attr = _RulesetAttr(handled, (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
                        (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    fd = libc.syscall(ctypes.c_long(nr["landlock_create_ruleset"]), ctypes.byref(attr), ctypes.c_size_t(size),
                      ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        read_rights = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
        write_rights = handled & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_IOCTL_DEV)
        dev_rights = FS_READ_FILE | FS_WRITE_FILE
        for paths, rights in ((read, read_rights), (write, write_rights), (devices, dev_rights)):
            for p in paths:
                try:
                    pfd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights & handled
                    if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                        allowed &= FS_FILE_RIGHTS
                    rule = _PathBeneathAttr(allowed, pfd)
                    if libc.syscall(ctypes.c_long(nr["landlock_add_rule"]), ctypes.c_int(fd),
                                    ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                    ctypes.c_uint32(0)) != 0:
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {p}")
                finally:
                    os.close(pfd)
        _no_new_privs(libc)
        if libc.syscall(ctypes.c_long(nr["landlock_restrict_self"]), ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(fd)
    return abi


def _no_new_privs(libc) -> None:
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def apply_no_new_processes() -> bool:
    """A seccomp filter: starting a program or a process fails with EPERM (threads still start).

    ``clone3`` fails with ENOSYS, so that the C library falls back to
    ``clone``, whose flags the filter can read.  False on a CPU this filter
    does not know.

    Denied with EPERM: ``fork``, ``vfork``, ``execve``, ``execveat`` (x86_64;
    ``execve`` and ``execveat`` on aarch64) and ``clone`` without
    ``CLONE_THREAD``.  A system call of another architecture (and, on
    x86_64, an x32 one) kills the process.  Sets ``PR_SET_NO_NEW_PRIVS``;
    applies to this process and everything it starts, for good.

    Returns
    -------
    bool
        True once the filter is installed; False off Linux or on a CPU other
        than x86_64 / aarch64 (nothing installed).

    Raises
    ------
    OSError
        ``prctl`` refused the filter or ``PR_SET_NO_NEW_PRIVS``.
    """
    spec = _SECCOMP.get(platform.machine())
    if spec is None or not sys.platform.startswith("linux"):
        return False
    ld_w_abs, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    prog: list[tuple[int, int, int, int]] = [
        (ld_w_abs, 0, 0, 4),  # seccomp_data.arch
        (jeq, 1, 0, spec["arch"]),
        (ret, 0, 0, kill),
        (ld_w_abs, 0, 0, 0),  # seccomp_data.nr
    ]
    if spec["x32"]:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]
    for nr in spec["deny"]:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, spec["clone3"]), (ret, 0, 0, enosys),
             (jeq, 0, 3, spec["clone"]),
             (ld_w_abs, 0, 0, 16),  # low 32 bits of args[0]: the clone flags
             (jset, 1, 0, CLONE_THREAD), (ret, 0, 0, eperm),
             (ret, 0, 0, allow)]
    filters = (_SockFilter * len(prog))(*[_SockFilter(*p) for p in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    libc = ctypes.CDLL(None, use_errno=True)
    _no_new_privs(libc)
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return True


def _set_limits(limits: dict) -> dict:
    import resource

    applied = {}
    wanted = {"RLIMIT_AS": limits["memory_bytes"], "RLIMIT_CPU": limits["cpu_seconds"],
              "RLIMIT_FSIZE": limits["file_bytes"], "RLIMIT_NOFILE": limits["open_files"], "RLIMIT_CORE": 0}
    for name, value in wanted.items():
        which = getattr(resource, name, None)
        if which is None:
            continue
        _, hard = resource.getrlimit(which)
        value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
        # CPU: the soft limit sends SIGXCPU; the hard one, a little later, SIGKILL
        try:
            resource.setrlimit(which, (value, value + 5 if name == "RLIMIT_CPU" and hard == resource.RLIM_INFINITY
                                       else value))
        except (ValueError, OSError):  # macOS refuses some (RLIMIT_AS): it is then not applied, and not reported
            continue
        applied[name] = value
    return applied


def probe(inputs: dict[str, Path], out: Path, *, read: tuple[str, ...] = (), write: tuple[str, ...] = (),
          connect: tuple[str, int] | None = None, spawn: bool = False, allocate_bytes: int = 0) -> dict:
    """What a confined child may do (a diagnostic, run with :func:`run_confined`).

    Tries to read each path of ``read``, to create each file of ``write``,
    to open a TCP connection to ``connect`` (host, port), to start a
    process, to allocate ``allocate_bytes``; returns, per attempt, ``"ok"``
    or the error.  Writes ``marker.txt`` into ``out``, ``$HOME`` and the
    working folder.

    Parameters
    ----------
    inputs : dict of str to pathlib.Path
        The input copies: each is read, and opened for appending (which the
        confinement should refuse).
    out : pathlib.Path
        The child's output folder.
    read : tuple of str
        Paths to open for reading.
    write : tuple of str
        Files to create (or truncate) for writing.
    connect : tuple of (str, int), optional
        A TCP ``(host, port)`` to connect to (5 s timeout); None: not tried.
    spawn : bool
        Also try to run ``/bin/true`` and to ``fork``.
    allocate_bytes : int
        Bytes to allocate at once (0: not tried).

    Returns
    -------
    dict
        ``home``, ``cwd``, ``pid``, and ``"ok"`` or ``"<ErrorType>: <message>"``
        under ``inputs``, ``input_writable``, ``read``, ``write`` (per path)
        and ``connect``, ``spawn``, ``fork``, ``allocate`` (when tried) and
        ``thread`` (always tried).
    """
    def attempt(fn) -> str:
        try:
            fn()
            return "ok"
        except BaseException as e:  # noqa: BLE001 - the point is to report it
            return f"{type(e).__name__}: {e}"

    report: dict[str, Any] = {"home": os.environ.get("HOME"), "cwd": os.getcwd(), "pid": os.getpid(),
                              "inputs": {k: attempt(lambda v=v: v.read_bytes()) for k, v in inputs.items()},
                              "input_writable": {k: attempt(lambda v=v: open(v, "ab").close())
                                                 for k, v in inputs.items()}}
    for folder in (out, Path(os.environ.get("HOME", out)), Path.cwd()):
        (folder / "marker.txt").write_text(f"written by the confined child {os.getpid()}\n")
    report["read"] = {p: attempt(lambda p=p: Path(p).open("rb").close()) for p in read}
    report["write"] = {p: attempt(lambda p=p: Path(p).open("wb").close()) for p in write}
    if connect:
        import socket

        def dial():
            with socket.create_connection(tuple(connect), timeout=5):
                pass

        report["connect"] = attempt(dial)
    if spawn:
        report["spawn"] = attempt(lambda: subprocess.run(["/bin/true"], check=True))
        report["fork"] = attempt(lambda: os.waitpid(pid, 0) if (pid := os.fork()) else os._exit(0))
    if allocate_bytes:
        report["allocate"] = attempt(lambda: bytearray(allocate_bytes))
    import threading

    report["thread"] = attempt(lambda: (t := threading.Thread(target=lambda: None), t.start(), t.join()))
    return report


def _memory_peaks() -> dict:
    """This process's peak address space and resident memory, in bytes (Linux; empty elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmPeak", "VmHWM"):
                    out[{"VmPeak": "address_space", "VmHWM": "resident"}[key]] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _child_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    applied: dict[str, Any] = {}

    def finish(payload: dict) -> int:
        payload.update(pid=os.getpid(), applied=applied, memory=_memory_peaks())
        tmp = out / (RESULT_NAME + ".part")
        tmp.write_text(json.dumps(payload, default=str))
        os.replace(tmp, out / RESULT_NAME)
        return 0

    try:
        linux = sys.platform.startswith("linux")
        if job.get("unshare"):  # first, while this process has one thread
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNET) failed")
        applied["own_network"] = bool(linux and job.get("parent_netns") and _netns() != job["parent_netns"])
        if os.name == "posix":
            applied["rlimits"] = _set_limits(job["limits"])
        module, _, func = job["target"].partition(":")
        if not module.startswith(TARGET_PREFIX):
            raise ValueError(f"not a segstudio function: {job['target']!r}")
        fn = getattr(importlib.import_module(module), func)
        if linux:  # its own /proc entries stay readable (libraries read them; so does _memory_peaks)
            applied["landlock"] = apply_landlock(job["read"] + job["read_only"] + ["/proc/self"], job["write"])
            applied["seccomp"] = apply_no_new_processes()
            applied["no_new_privs"] = True
        inputs = {k: Path(v) for k, v in job["inputs"].items()}
        value = fn(inputs, out, **job["args"])
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        from ..errors import SegStudioError

        message = e.message if isinstance(e, SegStudioError) else f"{type(e).__name__}: {e}"
        return finish({"ok": False, "error": message, "type": type(e).__name__})
    return finish({"ok": True, "value": value})


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
