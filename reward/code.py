'''Code reward: the fraction of a row's unit tests that the completion's code passes, run in a sandbox.

``unit_tests(completions, tests)`` takes the code from each completion (the last fenced python block, else
the last plain fenced block, else the whole text) and runs it with the row's ``tests``: a string of Python
(each top-level ``assert`` is one test; other statements are setup, run in order) or a list of strings (one
test each). Score = passed / total. Code that does not compile, crashes at import, hangs or exceeds a
limit passes only the tests it reported before it died. Rows whose tests are missing or unparsable score
None (skipped: the dataset, not the policy, is at fault).

Each row runs in a fresh ``python -I -B`` process (isolated: no PYTHON* variables, no user site, neither the
script's nor the current directory on sys.path), several at a time (``concurrency``), from one thread that
polls them. What the sandbox does:

1. Process: its own session and process group; at the wall-clock deadline (``timeout_s``) or when it
   exits, the whole group gets SIGKILL (the leader is signalled before it is reaped, so its pid cannot
   have been reused).
2. Limits (``setrlimit``): address space ``memory_mb``, CPU seconds ``timeout_s + 1``, 16 MiB per written
   file, 64 open files, no core dumps. They are set by the runner's first lines in the child, before the
   untrusted code is read, not in ``preexec_fn``: ``preexec_fn`` may deadlock when the parent has
   threads, and a trainer always has some (tokenizers, data loaders, loggers).
3. Privileges: when we are root (as in most GPU containers) and the interpreter is usable by uid 65534,
   the child runs as ``nobody`` with no supplementary groups. Then the kernel enforces what matters most:
   it cannot signal our processes, read ``/proc/<our pid>/environ`` or write where ``nobody`` cannot (home
   folders, the repository), and ``RLIMIT_NPROC`` (64) stops fork bombs, since it counts only sandbox
   processes. If the interpreter lives where ``nobody`` cannot read (pyenv under /root), we warn once and
   run as root; ``RLIMIT_NPROC`` is then not set (root ignores it; for another user it would count the
   user's whole session), and the in-process prelude below is the only guard.
4. Environment: only ``TMPDIR``, pointing at the throwaway working directory (deleted afterwards), and
   one-thread settings for OpenMP/BLAS; no secrets (``HF_TOKEN``, ``WANDB_API_KEY``) are passed. stdin,
   stdout and stderr are /dev/null, so printing a million lines costs nothing; results come back on a
   private pipe, one line per test, tagged with a random nonce.
5. Prelude (in-process, Python level): ``os.fork``/``exec*``/``spawn*``/``system``/``popen``,
   ``posix_spawn``, ``subprocess``, ``os.kill``/``killpg``, ``setsid``/``setpgid``, ``resource.setrlimit``
   raise PermissionError; ``ctypes``/``cffi`` cannot be imported; creating a socket raises (socketpair
   stays, asyncio needs it); ``open``/``os.open``/``FileIO``/``open_code`` and path-changing ``os`` calls
   may write only inside the working directory and read only it and Python's own installation.

What it does NOT protect against (do not run untrusted code you would not run on your machine):

- It is not a container, a seccomp filter, a mount or a network namespace. The prelude is Python-level:
  code that recovers the original functions (``gc``/frame introspection, a C extension already installed)
  gets real files, sockets and processes. Running as root without the privilege drop, that code is root.
- Grader tampering inside the process: objects whose ``__eq__`` always returns True, or code that finds
  the nonce through frame introspection and forges results. Use held-out tests to detect such hacks.
- Resource exhaustion beyond the limits: many 16 MiB files filling the disk, threads (without the drop),
  CPU used by other rows running concurrently, and time-of-check races on symlinked paths.
- Reading world-readable files (``/etc``, datasets) when running as ``nobody`` outside the prelude.
'''

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from alignkit.rewards import completion_text

logger = logging.getLogger("alignkit.reward.code")

SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
MAX_REPORT_BYTES = 1 << 20  # a hostile child may flood the result pipe; keep at most this much
_POLL_S = 0.005
_FENCE_RE = re.compile(r"^```[ \t]*(python3?|py)?[ \t]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL | re.IGNORECASE)

# Runs in the child as `python -I -B -c _RUNNER`. Everything before `exec(code)` is ours and trusted.
_RUNNER = r'''
import builtins, io, _io, json, os, posix, resource, socket, _socket, subprocess, _posixsubprocess, signal, sys

def limit(name, value):
    res = getattr(resource, name)
    hard = resource.getrlimit(res)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(res, (value, value))

def deny(what):
    def denied(*args, **kwargs):
        raise PermissionError(f"sandbox: {what} is disabled")
    return denied

def guard_files(root):
    root = os.path.realpath(root) + os.sep
    readable = tuple({os.path.realpath(p) + os.sep for p in
                      (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)})
    def check(path, write):
        if isinstance(path, int):
            return
        real = os.path.realpath(os.fsdecode(path)) + os.sep
        if not (real.startswith(root) or (not write and real.startswith(readable))):
            raise PermissionError(f"sandbox: {'writing' if write else 'reading'} {os.fsdecode(path)!r}")
    def writes(mode):
        return any(c in mode for c in "wax+")
    real_open, real_code, real_os_open, real_fileio = _io.open, _io.open_code, os.open, _io.FileIO
    def guarded_open(file, mode="r", *args, **kwargs):
        check(file, writes(mode))
        return real_open(file, mode, *args, **kwargs)
    def guarded_code(path):
        check(path, False)
        return real_code(path)
    flags_w = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None:
            raise PermissionError("sandbox: dir_fd is disabled")
        check(path, bool(flags & flags_w))
        return real_os_open(path, flags, mode)
    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            check(file, writes(mode))
            super().__init__(file, mode, *args, **kwargs)
    builtins.open = io.open = _io.open = guarded_open
    io.open_code = _io.open_code = guarded_code
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = posix.open = guarded_os_open
    def guard_paths(fn, positions):
        def guarded(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError("sandbox: dir_fd is disabled")
            for i in positions:
                if i < len(args):
                    check(args[i], True)
            return fn(*args, **kwargs)
        return guarded
    for name, positions in (("remove", (0,)), ("unlink", (0,)), ("rmdir", (0,)), ("mkdir", (0,)),
                            ("rename", (0, 1)), ("replace", (0, 1)), ("link", (0, 1)), ("symlink", (1,)),
                            ("chmod", (0,)), ("chown", (0,)), ("lchown", (0,)), ("truncate", (0,)),
                            ("utime", (0,)), ("mkfifo", (0,)), ("mknod", (0,))):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, guard_paths(getattr(module, name), positions))

def no_processes_no_network():
    for name in ("fork forkpty system popen posix_spawn posix_spawnp execv execve execl execle execlp "
                 "execlpe execvp execvpe spawnv spawnve spawnvp spawnvpe spawnl spawnle spawnlp spawnlpe "
                 "kill killpg setsid setpgid setpgrp chroot").split():
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, deny(f"os.{name}"))
    signal.pthread_kill = deny("signal.pthread_kill")
    signal.pidfd_send_signal = deny("signal.pidfd_send_signal")
    _posixsubprocess.fork_exec = deny("process creation")
    subprocess.Popen = deny("subprocess")
    resource.setrlimit = resource.prlimit = deny("resource.setrlimit")
    for name in ("ctypes", "_ctypes", "cffi", "_cffi_backend"):
        sys.modules[name] = None  # import raises ImportError
    real_socket = _socket.socket  # socket.socket.__init__ calls _socket.socket.__init__ by name: guard that
    class NoNewSocket(real_socket):  # socketpair() wraps an existing fd: allowed (asyncio needs it)
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                raise PermissionError("sandbox: network access is disabled")
            real_socket.__init__(self, family, type, proto, fileno)
    _socket.socket = _socket.SocketType = socket.SocketType = NoNewSocket
    socket.create_connection = socket.create_server = deny("network access")

def main():
    with open("job.json") as f:
        job = json.load(f)
    os.unlink("job.json")  # the tests are not left lying around for the code to read
    nonce, fd, write = job["nonce"], job["fd"], os.write
    for name, value in job["limits"].items():
        limit(name, value)
    guard_files(os.getcwd())
    no_processes_no_network()
    scope = {"__name__": "solution", "__builtins__": builtins}  # not __main__: demo blocks do not run
    try:
        exec(compile(job["code"], "solution.py", "exec"), scope)
    except BaseException:
        return
    index, setup_ok = 0, True
    for counted, source in job["units"]:
        passed = False
        if setup_ok:
            try:
                exec(compile(source, "tests.py", "exec"), scope)
                passed = True
            except BaseException:
                setup_ok = counted  # a failed test is just a fail; failed setup fails every later test
        if counted:
            write(fd, f"{nonce} {index} {int(passed)}\n".encode())
            index += 1

main()
os._exit(0)  # skip atexit handlers and non-daemon threads the code may have left behind
'''


def extract_code(text: str) -> str:
    """The last fenced python block, else the last plain fenced block, else the whole text.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
    'def f():\\n    return 1\\n'
    >>> extract_code("x = 1")
    'x = 1'
    """
    blocks = [(lang, body) for lang, body in _FENCE_RE.findall(text)]
    tagged = [body for lang, body in blocks if lang]
    if tagged:
        return tagged[-1]
    return blocks[-1][1] if blocks else text


def parse_tests(tests: Any) -> list[tuple[bool, str]] | None:
    """``(counted, source)`` per unit: asserts count, other top-level statements are setup; None if unusable.

    >>> parse_tests("from math import sqrt\\nassert sqrt(4) == 2\\nassert 1 + 1 == 2")
    [(False, 'from math import sqrt'), (True, 'assert sqrt(4) == 2'), (True, 'assert 1 + 1 == 2')]
    """
    if isinstance(tests, str):
        try:
            body = ast.parse(tests).body
        except (SyntaxError, ValueError):
            return None
        return [(isinstance(node, ast.Assert), ast.unparse(node)) for node in body]
    if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        try:
            for t in tests:
                compile(t, "tests.py", "exec")
        except (SyntaxError, ValueError):
            return None
        return [(True, t) for t in tests]
    return None


def _can_drop_privileges(python: str) -> bool:
    """Whether we are root and ``python`` runs as nobody in a sandbox working dir (not under a /root pyenv)."""
    return os.geteuid() == 0 and _probe_drop(python, tempfile.gettempdir())


@lru_cache(maxsize=None)
def _probe_drop(python: str, tmp_root: str) -> bool:
    workdir = _make_workdir(drop=True)
    try:
        probe = subprocess.run([python, "-I", "-B", "-c", "pass"], cwd=workdir, env={}, timeout=30,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               user=SANDBOX_UID, group=SANDBOX_GID, extra_groups=[])
        ok = probe.returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not ok:
        logger.warning("code sandbox runs as root: %s cannot run as uid %d in %s; only the in-process prelude "
                       "guards files, processes and network (see reward/code.py)", python, SANDBOX_UID, tmp_root)
    return ok


def _make_workdir(drop: bool) -> str:
    workdir = tempfile.mkdtemp(prefix="alignkit-code-")
    if drop:
        os.chown(workdir, SANDBOX_UID, SANDBOX_GID)
    return workdir


@dataclass
class _Run:
    row: int
    total: int
    proc: subprocess.Popen
    read_fd: int
    nonce: str
    workdir: str
    deadline: float
    report: bytearray = field(default_factory=bytearray)


def _start(row: int, code: str, units: list[tuple[bool, str]], python: str, drop: bool,
           limits: dict[str, int], timeout_s: float) -> _Run:
    workdir = _make_workdir(drop)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "fd": write_fd, "code": code, "units": units, "limits": limits}
    with open(os.path.join(workdir, "job.json"), "w") as f:
        json.dump(job, f)
    os.chmod(os.path.join(workdir, "job.json"), 0o644)
    user = {"user": SANDBOX_UID, "group": SANDBOX_GID, "extra_groups": []} if drop else {}
    try:
        proc = subprocess.Popen([python, "-I", "-B", "-c", _RUNNER], cwd=workdir, env=_child_env(workdir),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=(write_fd,), start_new_session=True, **user)
    except BaseException:
        os.close(read_fd)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        os.close(write_fd)
    total = sum(counted for counted, _ in units)
    return _Run(row, total, proc, read_fd, nonce, workdir, time.monotonic() + timeout_s)


def _child_env(workdir: str) -> dict[str, str]:
    # No secrets. One BLAS/OpenMP thread: on a many-core host numpy would otherwise start a thread per core,
    # which RLIMIT_NPROC (it counts threads) and RLIMIT_AS would refuse.
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"TMPDIR": workdir, **threads}


def _drain(run: _Run) -> None:
    for _ in range(16):  # bounded: a child writing as fast as we read must not keep us here
        try:
            chunk = os.read(run.read_fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            return
        if len(run.report) < MAX_REPORT_BYTES:
            run.report += chunk


def _exited(proc: subprocess.Popen) -> bool:
    # WNOWAIT: look without reaping, so the pid (= process group id) stays ours until we killpg it.
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped elsewhere (SIGCHLD ignored by the host program)
        return True


def _finish(run: _Run) -> float:
    """Kill the run's process group, reap it, clean up, and score what it reported."""
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)
    except OSError:
        pass
    run.proc.wait()
    _drain(run)
    os.close(run.read_fd)
    shutil.rmtree(run.workdir, ignore_errors=True)
    passed = set()
    for line in bytes(run.report).decode("ascii", "replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == run.nonce and parts[1].isdigit() and parts[2] == "1":
            passed.add(int(parts[1]))
    return len({i for i in passed if i < run.total}) / run.total


def unit_tests(completions: list, tests: list, *, timeout_s: float = 5.0, memory_mb: int = 1024,
               concurrency: int = 4, drop_privileges: bool = True, python: str | None = None,
               **kwargs: Any) -> list[float | None]:
    """Fraction of each row's ``tests`` that its completion's code passes, in a sandbox (see module doc).

    ``timeout_s`` is the wall-clock budget of one row (its process group is killed after it);
    ``memory_mb`` its address-space limit; ``concurrency`` how many rows run at once;
    ``drop_privileges`` runs the child as nobody when we are root and it can; ``python`` is the
    interpreter (default: ours, so the code sees the same installed packages).

    >>> unit_tests(["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b): return a - b"],
    ...            tests=["assert add(1, 2) == 3\\nassert add(0, 0) == 0"] * 2)
    [1.0, 0.5]
    """
    python = python or sys.executable
    drop = drop_privileges and _can_drop_privileges(python)
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(timeout_s) + 1,
              "RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
    if drop:
        limits["RLIMIT_NPROC"] = 64  # counts only sandbox processes (uid nobody)
    scores: list[float | None] = [None] * len(completions)
    pending: deque[tuple[int, str, list[tuple[bool, str]]]] = deque()
    for row, (completion, row_tests) in enumerate(zip(completions, tests, strict=True)):
        units = parse_tests(row_tests)
        if units is None or not any(counted for counted, _ in units):
            logger.warning("unit_tests: row %d has no usable tests (%.60r); scored None", row, row_tests)
            continue
        pending.append((row, extract_code(completion_text(completion)), units))
    running: list[_Run] = []
    try:
        while pending or running:
            while pending and len(running) < max(1, concurrency):
                running.append(_start(*pending.popleft(), python, drop, limits, timeout_s))
            time.sleep(_POLL_S)
            for run in list(running):
                _drain(run)
                if _exited(run.proc) or time.monotonic() > run.deadline:
                    running.remove(run)
                    scores[run.row] = _finish(run)
    finally:
        for run in running:  # only on an exception (e.g. KeyboardInterrupt): leave nothing behind
            _finish(run)
    return scores
