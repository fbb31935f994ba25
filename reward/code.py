'''Code reward: the fraction of a row's unit tests that the completion's code passes, run in a kernel sandbox.

``unit_tests(completions, tests)`` takes the code from each completion (the last fenced python block, else
the last plain fenced block, else the whole text) and runs it with the row's ``tests``: a string of Python
(each top-level ``assert`` is one test; other statements are setup, run in order) or a list of strings (one
test each). Score = passed / total. Code that does not compile, crashes at import, hangs or exceeds a
limit passes only the tests it passed before it died. Rows whose tests are missing or unparsable score
None (skipped: the dataset, not the policy, is at fault). docs/sandbox.md has the whole story; in short:

Isolation (kernel-enforced, bubblewrap). Each row runs ``python -I -B`` in a fresh ``bwrap`` sandbox with its
own PID, network, IPC, UTS and mount namespaces: no network but a loopback of its own; no process of ours
visible or signallable (its own /proc); every process it starts dies with it (killing the sandbox's PID 1
kills them all, and we wait until they are gone); a read-only view of /usr, /lib* and the interpreter's own
folders (its prefix, venv, site-packages) and nothing else of the host: no repository, no home, no host /tmp;
one writable folder, a private size-limited tmpfs at /tmp (its working directory); an empty environment but
for PATH, HOME=TMPDIR=/tmp and one-thread BLAS settings: no ``HF_TOKEN`` or ``WANDB_API_KEY``. Two ways to
get there, probed once per interpreter (the first that works is used):

- ``bwrap`` (we are root, e.g. a VM or a ``--privileged`` container): real root builds the namespaces, so the
  interpreter may live where only root can reach (pyenv under /root); the code then runs as uid 65534
  (nobody) with no capabilities and no_new_privs: it owns nothing it can see, and ``RLIMIT_NPROC`` (64,
  shared by all rows running at once) stops fork bombs.
- ``bwrap-userns`` (not root, or root without CAP_SYS_ADMIN): an unprivileged user namespace, as ourselves
  (as nobody when we are root); ``RLIMIT_NPROC`` counts that namespace's processes only.

Limits (``setrlimit``, set by the harness before it reads any untrusted code): address space ``memory_mb``,
CPU seconds ``timeout_s + 1``, 16 MiB per written file, 64 open files, 64 processes (not when unisolated
as ourselves), no core dumps; the wall-clock deadline ``timeout_s`` kills the sandbox. stdout/stderr go to /dev/null.

Without isolation (no bwrap, or namespaces forbidden, as in a default docker container) ``unit_tests``
refuses, with one line saying how to get it, unless the caller opts in: ``sandbox={"allow_unisolated":
True}`` (a recipe: ``{program: reward/code.py:unit_tests, kwargs: {sandbox: {allow_unisolated: true}}}``)
or ``ALIGNKIT_SANDBOX_ALLOW_UNISOLATED=1`` (for ``alignkit grade``). Unisolated, the code runs as a plain
child with the limits, a clean environment and a throwaway working directory, as nobody when we are root
and the interpreter is readable by nobody; nothing stops it from reading, writing or connecting where that
user may. ``ALIGNKIT_SANDBOX_ISOLATION=bwrap|bwrap-userns`` forces one mode (for tests and diagnosis).

Judging (against fake passes). The tests are parsed here, in the grader. For an assert that compares with a
literal (``assert f(1) == 2``, ``!=``, ``<``, ``in``, ``is None`` ...), the literal stays here and never
reaches the sandbox: the child evaluates only ``f(1)`` and sends its value back as plain data (exact int,
float, complex, str, bytes, None, bool, and lists, tuples, dicts, sets, ranges of them; subclasses and
numpy scalars are converted through their own ``__index__``/``__float__``/...; anything else fails the
test); we rebuild it as true builtins and compare here. An object whose ``__eq__`` always says True cannot
be sent, and forging a result means knowing the expected value. Comparisons with both sides computed are
judged the same way (both values sent; the child knows both, though). Other asserts (``assert f(x)``,
``assert math.isclose(f(x), 0.3)``) are evaluated in the child, which sends ``bool(value)``. The child
compiles every test before the solution runs, holds private references to what it uses (compile, exec,
eval, os.write, json.dumps, ...), and evaluates the tests with the builtins as they were before the
solution ran; results go on a private pipe, one line per test, tagged with a random nonce; each test counts
once.

What it does NOT protect against:

- Code that fakes the truth of an assert evaluated in the child (not a literal comparison): it can patch a
  helper module the test uses (``math.isclose = lambda *a, **k: True``) or find the nonce by frame
  introspection and write "true" for such tests. Prefer ``assert f(x) == <literal>`` tests.
- Kernel bugs (there is no seccomp filter), CPU shared with other rows, and total memory:
  each process may use ``memory_mb`` and a sandbox may hold up to 64 processes (the tmpfs is size-limited).
- Reading what is world-readable in the read-only view (/usr, the interpreter's folders).
'''

from __future__ import annotations

import ast
import json
import logging
import math
import operator
import os
import re
import secrets
import select
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

from alignkit.core.errors import AlignkitError, RecipeError
from alignkit.rewards.values import completion_text

logger = logging.getLogger("alignkit.reward.code")

SANDBOX_UID = SANDBOX_GID = 65534  # nobody / nogroup
ISOLATIONS = ("bwrap", "bwrap-userns")  # tried in this order; see the module doc
_LABELS = {"bwrap": "bwrap as root", "bwrap-userns": "bwrap in a user namespace"}
SCRATCH_BYTES = 64 << 20  # the sandbox's /tmp (its working directory), a tmpfs
SHM_BYTES = 16 << 20  # its /dev/shm
MAX_REPORT_BYTES = 16 << 20  # a hostile child may flood the result pipe; keep at most this much
ALLOW_ENV, ISOLATION_ENV = "ALIGNKIT_SANDBOX_ALLOW_UNISOLATED", "ALIGNKIT_SANDBOX_ISOLATION"
_POLL_S = 0.005
_FENCE_RE = re.compile(r"^```[ \t]*(python3?|py)?[ \t]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL | re.IGNORECASE)


class SandboxUnavailable(AlignkitError):
    """No kernel isolation here and the caller did not accept running untrusted code without it."""


# Runs in the child as `python -I -B -c _RUNNER JOB_FD OUT_FD`. Everything here is ours and trusted; it binds
# what it needs to local names and compiles every test before the untrusted code runs.
_RUNNER = r'''
import builtins, collections.abc, json, operator, os, resource, sys

def limit(name, value):
    res = getattr(resource, name)
    hard = resource.getrlimit(res)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(res, (value, value))

def drop_to(uid, gid):
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        os._exit(70)

def make_encoder():
    """Value -> JSON-able tagged data, exact builtins only (the grader rebuilds and compares them)."""
    type_, isinstance_, hasattr_, hex_, fhex, items = type, isinstance, hasattr, hex, float.hex, dict.items
    bool_, int_, float_, complex_, str_, bytes_, bytearray_, dict_, range_, set_ = (
        bool, int, float, complex, str, bytes, bytearray, dict, range, set)
    exact = {list: "l", tuple: "t", set: "S", frozenset: "F"}
    bases = (tuple, list, dict, set, frozenset, str, bytes)
    views = (collections.abc.KeysView, collections.abc.ItemsView)
    numbers = (("__index__", operator.index), ("__float__", float), ("__complex__", complex))

    def encode(value, depth=0):
        if depth > 200:
            raise ValueError("too deep")
        kind = type_(value)
        if value is None or kind is bool_:
            return value
        if kind is int_:
            return ["i", hex_(value)]
        if kind is float_:
            return ["f", fhex(value)]
        if kind is complex_:
            return ["c", fhex(value.real), fhex(value.imag)]
        if kind is str_:
            return ["s", value]
        if kind is bytes_ or kind is bytearray_:
            return ["b", value.hex()]
        if kind in exact:
            return [exact[kind], [encode(v, depth + 1) for v in value]]
        if kind is dict_:
            return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in items(value)]]
        if kind is range_:
            return ["r", hex_(value.start), hex_(value.stop), hex_(value.step)]
        # Not an exact builtin (a subclass, a numpy scalar): convert it through its own conversion; the
        # result is encoded again, so only exact builtins ever leave.
        for base in bases:
            if isinstance_(value, base):
                return encode(base(value), depth + 1)
        if isinstance_(value, views):
            return encode(set_(value), depth + 1)
        for method, convert in numbers:
            if hasattr_(kind, method):
                return encode(convert(value), depth + 1)
        raise TypeError("not comparable outside the sandbox")
    return encode

def main(job_fd, out_fd):
    write, dumps, loads, bool_ = os.write, json.dumps, json.loads, bool
    compile_, exec_, eval_ = compile, exec, eval
    with open(job_fd, "rb") as f:  # closes the fd: the job is not left for the code to find
        job = loads(f.read())
    for name, value in job["limits"].items():
        limit(name, value)
    if job["uid"] is not None and os.getuid() == 0:
        drop_to(job["uid"], job["gid"])
    nonce, encode = job["nonce"], make_encoder()

    def send(text):
        data = text.encode()
        while data:
            data = data[write(out_fd, data):]

    try:
        solution = compile_(job["code"], "solution.py", "exec", dont_inherit=True)
    except BaseException:
        return
    units = []
    for unit in job["units"]:
        try:
            steps = [(kind, compile_(src, "tests.py", "exec" if kind == "exec" else "eval", dont_inherit=True))
                     for kind, src in unit["steps"]]
        except BaseException:
            steps = None
        units.append((unit["counted"], steps))
    clean_builtins = dict(builtins.__dict__)  # the tests see the builtins as they were before the code ran
    scope = {"__name__": "solution", "__builtins__": builtins}  # not __main__: demo blocks do not run
    del job
    try:
        exec_(solution, scope)
    except BaseException:
        return
    scope["__builtins__"] = clean_builtins  # functions the code defined keep the builtins they were made with
    index, setup_ok = 0, True
    for counted, steps in units:
        values, ok = [], setup_ok and steps is not None
        if ok:
            try:
                for kind, step in steps:
                    if kind == "exec":
                        exec_(step, scope)
                    else:
                        value = eval_(step, scope)
                        values.append(bool_(value) if kind == "truth" else encode(value))
                line = f"{nonce} {index} {dumps(values)}\n"
            except BaseException:
                ok = False
        if not counted:
            setup_ok = setup_ok and ok  # a failed test is just a fail; failed setup fails the rest
        elif ok:
            send(line)
        index += counted

main(int(sys.argv[1]), int(sys.argv[2]))
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


# ------------------------------------------------------------------------------------------- parsing tests

_OPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
        ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_SINGLETONS = (None, True, False, Ellipsis)  # `is` means the same after a round trip only for these


@dataclass(frozen=True)
class Unit:
    """One setup statement or one test. ``steps`` run in the child, in order: ``("exec", src)``, or
    ``("value", expr)`` / ``("truth", expr)`` whose value / ``bool`` it sends back; ``check`` (here only,
    with the literals) judges the values sent; None: the unit passes when its steps run without error."""

    counted: bool
    steps: tuple[tuple[str, str], ...]
    check: tuple | None = None


def parse_tests(tests: Any) -> list[Unit] | None:
    """The units of a row's tests: asserts count, other top-level statements are setup; None if unusable.

    >>> [(u.counted, u.steps) for u in parse_tests("from math import sqrt\\nassert sqrt(4) == 2")]
    [(False, (('exec', 'from math import sqrt'),)), (True, (('value', 'sqrt(4)'),))]
    >>> parse_tests("assert add(1, 2) == 3")[0].check
    ('all', [('cmp', 'Eq', ('val', 0), ('lit', 3))])
    """
    if isinstance(tests, str):
        body = _parse(tests)
        if body is None:
            return None
        return [_assert_unit([node]) if isinstance(node, ast.Assert) else Unit(False, (("exec", ast.unparse(node)),))
                for node in body]
    if isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
        bodies = [_parse(t) for t in tests]
        return None if any(b is None for b in bodies) else [_assert_unit(b) for b in bodies]
    return None


def _parse(source: str) -> list[ast.stmt] | None:
    try:
        return ast.parse(source).body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _assert_unit(statements: list[ast.stmt]) -> Unit:
    """One counted unit from statements: top-level asserts become checks judged here, the rest runs there."""
    steps: list[tuple[str, str]] = []
    checks = []

    def sent(expr: ast.expr, kind: str) -> int:
        steps.append((kind, ast.unparse(expr)))
        return sum(k != "exec" for k, _ in steps) - 1  # its index among the values sent back

    def check(expr: ast.expr) -> tuple:
        if isinstance(expr, ast.BoolOp) and isinstance(expr.op, ast.And):
            return ("all", [check(value) for value in expr.values])
        if isinstance(expr, ast.Compare) and _judged_here(expr):
            operands = [_literal(e) for e in [expr.left, *expr.comparators]]
            sides = [("lit", lit[0]) if lit else ("val", sent(e, "value"))
                     for lit, e in zip(operands, [expr.left, *expr.comparators])]
            return ("all", [("cmp", type(op).__name__, a, b) for op, a, b in zip(expr.ops, sides, sides[1:])])
        return ("truth", sent(expr, "truth"))

    for node in statements:
        if isinstance(node, ast.Assert):
            checks.append(check(node.test))  # the message is never evaluated: it may hold the expected value
        else:
            steps.append(("exec", ast.unparse(node)))
    return Unit(True, tuple(steps), ("all", checks) if len(checks) > 1 else checks[0] if checks else None)


def _literal(expr: ast.expr) -> tuple[Any] | None:
    try:
        return (ast.literal_eval(expr),)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _judged_here(expr: ast.Compare) -> bool:
    """Whether we can judge this comparison from values sent back (``is`` only against None/True/False)."""
    operands = [expr.left, *expr.comparators]
    for op, a, b in zip(expr.ops, operands, operands[1:]):
        if type(op) not in _OPS:
            return False
        if isinstance(op, (ast.Is, ast.IsNot)):
            lits = [lit for lit in (_literal(a), _literal(b)) if lit]
            if not any(any(lit[0] is s for s in _SINGLETONS) for lit in lits):
                return False
    return True


def child_units(units: list[Unit]) -> list[dict]:
    """What the child gets of the tests: the steps to run, never the checks (they hold the expected values)."""
    return [{"counted": u.counted, "steps": [list(step) for step in u.steps]} for u in units]


# ---------------------------------------------------------------------------------------- judging results


def _decode(data: Any) -> Any:
    """Tagged data from the child -> true builtins (any other shape raises): nothing here runs its code."""
    if data is None or data is True or data is False:
        return data
    if type(data) is not list or not data or type(data[0]) is not str:
        raise ValueError("bad value")
    tag, args = data[0], data[1:]
    if tag in ("i", "f", "s", "b") and len(args) == 1 and type(args[0]) is str:
        text = args[0]
        return {"i": lambda: int(text, 16), "f": lambda: float.fromhex(text), "s": lambda: text,
                "b": lambda: bytes.fromhex(text)}[tag]()
    if tag == "c" and len(args) == 2 and all(type(a) is str for a in args):
        return complex(float.fromhex(args[0]), float.fromhex(args[1]))
    if tag == "r" and len(args) == 3 and all(type(a) is str for a in args):
        return range(*(int(a, 16) for a in args))
    if tag in ("l", "t", "S", "F") and len(args) == 1 and type(args[0]) is list:
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](_decode(v) for v in args[0])
    if tag == "d" and len(args) == 1 and type(args[0]) is list:
        if not all(type(pair) is list and len(pair) == 2 for pair in args[0]):
            raise ValueError("bad dict")
        return {_decode(k): _decode(v) for k, v in args[0]}
    raise ValueError(f"bad tag {tag!r}")


def _holds(check: tuple, values: list) -> bool:
    kind = check[0]
    if kind == "all":
        return all(_holds(c, values) for c in check[1])
    if kind == "truth":
        return values[check[1]] is True
    _, op, a, b = check
    side = lambda s: s[1] if s[0] == "lit" else values[s[1]]  # noqa: E731
    return bool(_OPS[getattr(ast, op)](side(a), side(b)))


def _judge(unit: Unit, payload: bytes) -> bool:
    """Whether the values the child sent for ``unit`` pass its check (junk or a wrong shape fails)."""
    kinds = [kind for kind, _ in unit.steps if kind != "exec"]
    try:
        sent = json.loads(payload)
        if type(sent) is not list or len(sent) != len(kinds):
            return False
        values = []
        for kind, value in zip(kinds, sent):
            if kind == "truth" and type(value) is not bool:
                return False
            values.append(value if kind == "truth" else _decode(value))
        return unit.check is None or _holds(unit.check, values)
    except Exception:  # noqa: BLE001 - junk, unhashable keys, incomparable values, too deep: a fail
        return False


# ---------------------------------------------------------------------------------------------- isolation


def _bwrap() -> str | None:
    return shutil.which("bwrap") or (os.path.exists("/usr/bin/bwrap") and "/usr/bin/bwrap") or None


@lru_cache(maxsize=None)
def _bwrap_help(bwrap: str) -> str:
    try:
        return subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@lru_cache(maxsize=None)
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """The folders ``python`` needs, read-only: its prefixes (venv and base) and the folder of its binary."""
    if python == sys.executable:
        prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    else:
        query = ("import json, sys; "
                 "print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))")
        out = subprocess.run([python, "-I", "-c", query], capture_output=True, text=True, timeout=60, env={})
        prefixes = json.loads(out.stdout)
    dirs = {os.path.dirname(os.path.abspath(python)), os.path.dirname(os.path.realpath(python))}
    dirs |= {os.path.abspath(p) for p in prefixes} | {os.path.realpath(p) for p in prefixes}
    too_wide = {"/", os.path.expanduser("~"), os.path.realpath(os.path.expanduser("~"))}
    dirs = sorted(d for d in dirs if d not in too_wide and not _under(os.path.realpath(d), "/usr"))  # /usr: bound
    return tuple(d for i, d in enumerate(dirs) if not any(_under(d, p) for p in dirs[:i]))


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _bwrap_argv(bwrap: str, isolation: str, python: str, info_fd: int) -> list[str]:
    """bwrap's command line: namespaces, the read-only view, the one writable tmpfs, a clean environment."""
    features = _bwrap_help(bwrap)
    argv = [bwrap, "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    if isolation == "bwrap":  # real root builds it; the runner drops to nobody with these two capabilities
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-all", "--unshare-user"] + (["--disable-userns"] if "--disable-userns" in features else [])
    argv += ["--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--perms", "0755", "--dir", "/etc"]
    for path in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime"):
        argv += ["--ro-bind-try", path, path]
    made = {"/", "/usr", "/etc"}
    for folder in _interpreter_dirs(python):
        for parent in _parents(folder):  # traversable by nobody whatever the host's modes (/root is 0700)
            if parent not in made and not _under(os.path.realpath(parent), "/usr"):
                argv += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        argv += ["--ro-bind", folder, folder]
    size = lambda n: ["--size", str(n)] if "--size" in features else []  # noqa: E731
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", *size(SHM_BYTES), "--tmpfs", "/dev/shm",
             "--remount-ro", "/dev", "--perms", "1777", *size(SCRATCH_BYTES), "--tmpfs", "/tmp",
             "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
    for key, value in _child_env("/tmp").items():
        argv += ["--setenv", key, value]
    return argv


def _parents(folder: str) -> list[str]:
    parts = folder.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _child_env(workdir: str) -> dict[str, str]:
    # No secrets. One BLAS/OpenMP thread: on a many-core host numpy would otherwise start a thread per core,
    # which RLIMIT_NPROC (it counts threads) and RLIMIT_AS would refuse.
    threads = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            **threads}


def isolation_works(isolation: str, python: str) -> bool:
    """Whether ``isolation`` runs ``python`` here (probed once per interpreter, by grading one tiny row)."""
    return _probe(isolation, python, os.geteuid()) is None


@lru_cache(maxsize=None)
def _probe(isolation: str, python: str, euid: int) -> str | None:
    """None if ``isolation`` works here, else why not (one line)."""
    if _bwrap() is None:
        return "bwrap is not installed"
    if isolation == "bwrap" and euid != 0:
        return "we are not root"
    with tempfile.TemporaryFile() as errors:
        try:
            scores = _grade([(0, "x = 1", parse_tests("assert x == 1"))], python, isolation, _limits(30, 1024, True),
                            timeout_s=30, concurrency=1, stderr=errors)
        except (OSError, ValueError, subprocess.SubprocessError) as error:  # e.g. the interpreter is missing
            return f"{type(error).__name__}: {error}"
        errors.seek(0)
        said = errors.read().decode(errors="replace").strip().splitlines()
    reason = said[-1] if said else f"the probe scored {scores}"
    return None if scores == [1.0] else reason.removeprefix("bwrap: ")


def _choose_isolation(python: str, allow_unisolated: bool) -> str:
    forced = os.environ.get(ISOLATION_ENV, "").strip()
    if forced and forced not in ISOLATIONS:
        raise SandboxUnavailable(f"{ISOLATION_ENV}={forced!r}: choose one of {list(ISOLATIONS)}")
    candidates = [forced] if forced else list(ISOLATIONS)
    for isolation in candidates:
        if isolation_works(isolation, python):
            return isolation
    if allow_unisolated:
        _warn_unisolated()
        return "none"
    if _bwrap() is None:
        why, fix = "bwrap is not installed", "install bubblewrap (apt-get install bubblewrap)"
    else:
        why = "; ".join(f"{_LABELS[i]}: {_probe(i, python, os.geteuid())}" for i in candidates)
        fix = ("allow namespaces (run as root, or allow unprivileged user namespaces with an interpreter that "
               "uid 65534 can read; docker: --privileged, or --cap-add SYS_ADMIN --security-opt seccomp=unconfined "
               "--security-opt apparmor=unconfined)")
    raise SandboxUnavailable(
        f"reward/code.py:unit_tests will not run untrusted code without kernel isolation ({why}); {fix}, or "
        "accept the risk: kwargs: {sandbox: {allow_unisolated: true}} on the reward in a recipe, "
        f"{ALLOW_ENV}=1 for alignkit grade (see docs/sandbox.md)")


@lru_cache(maxsize=None)
def _warn_unisolated() -> None:
    logger.warning("reward/code.py:unit_tests runs untrusted code WITHOUT kernel isolation (allow_unisolated): "
                   "it can read, write and connect wherever its user can; see docs/sandbox.md")


# ------------------------------------------------------------------------------------------ running rows


@dataclass
class _Run:
    row: int
    units: list[Unit]  # the counted ones, in order: what each reported line is judged against
    proc: subprocess.Popen
    read_fd: int
    nonce: str
    deadline: float
    workdir: str | None = None  # unisolated only: a host folder to delete
    info_fd: int | None = None  # bwrap only: where it says the host pid of the sandbox's PID 1
    info: bytearray = field(default_factory=bytearray)
    pidfd: int | None = None  # a pidfd of the sandbox's PID 1, once known
    report: bytearray = field(default_factory=bytearray)


def _limits(timeout_s: float, memory_mb: int, nproc: bool) -> dict[str, int]:
    limits = {"RLIMIT_AS": memory_mb << 20, "RLIMIT_CPU": math.ceil(timeout_s) + 1,
              "RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
    if nproc:  # only where it counts sandbox processes alone (not for root, nor for our own user)
        limits["RLIMIT_NPROC"] = 64
    return limits


def _job_fd(job: dict) -> int:
    """The job in an anonymous file; the child reads it from this fd and closes it before running code."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("alignkit-job")
    else:  # not Linux (unisolated only): an unlinked temporary file
        fd, path = tempfile.mkstemp()
        os.unlink(path)
    data = json.dumps(job).encode()
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _start(row: int, code: str, units: list[Unit], python: str, isolation: str, limits: dict[str, int],
           timeout_s: float, drop: bool = False, stderr: Any = subprocess.DEVNULL) -> _Run:
    """Start one row's child: its job in an anonymous file, a pipe for its results, one for bwrap's info."""
    nonce = secrets.token_hex(16)
    as_root = isolation == "bwrap"  # the runner drops to nobody itself
    job = {"nonce": nonce, "code": code, "units": child_units(units), "limits": limits,
           "uid": SANDBOX_UID if as_root else None, "gid": SANDBOX_GID if as_root else None}
    job_fd = _job_fd(job)
    read_fd = write_fd = info_read = info_write = workdir = None
    try:
        read_fd, write_fd = os.pipe()
        info_read, info_write = os.pipe() if isolation != "none" else (None, None)
        workdir = _make_workdir(drop) if isolation == "none" else None
        argv, options = _command(isolation, python, [job_fd, write_fd], workdir, info_write, drop)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True, **options)
    except BaseException:
        for fd in (read_fd, info_read):
            if fd is not None:
                os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        for fd in (job_fd, write_fd, info_write):  # the child has its copies
            if fd is not None:
                os.close(fd)
    for fd in (read_fd, info_read):
        if fd is not None:
            os.set_blocking(fd, False)
    counted = [u for u in units if u.counted]
    return _Run(row, counted, proc, read_fd, nonce, time.monotonic() + timeout_s, workdir, info_read)


def _command(isolation: str, python: str, fds: list[int], workdir: str | None, info_fd: int | None,
             drop: bool) -> tuple[list[str], dict[str, Any]]:
    """One row's command line (the runner, in bwrap unless unisolated) and its Popen options."""
    argv = [python, "-I", "-B", "-c", _RUNNER, *map(str, fds)]
    if isolation == "none":
        options: dict[str, Any] = {"cwd": workdir, "env": _child_env(workdir), "pass_fds": fds}
    else:
        argv = _bwrap_argv(_bwrap() or "bwrap", isolation, python, info_fd) + argv
        options = {"cwd": "/", "env": {}, "pass_fds": (*fds, info_fd)}
        drop = isolation == "bwrap-userns" and os.geteuid() == 0  # then bwrap itself runs as nobody
    if drop:
        options.update(user=SANDBOX_UID, group=SANDBOX_GID, extra_groups=[])
    return argv, options


def _make_workdir(drop: bool) -> str:
    workdir = tempfile.mkdtemp(prefix="alignkit-code-")
    if drop:
        os.chown(workdir, SANDBOX_UID, SANDBOX_GID)
    return workdir


def _read_some(fd: int, into: bytearray, cap: int) -> bool:
    """Read what is there (bounded: a child writing as fast as we read must not keep us); True at EOF."""
    for _ in range(16):
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return False
        if not chunk:
            return True
        if len(into) < cap:
            into += chunk
    return False


def _watch_sandbox(run: _Run) -> None:
    """Once bwrap says the host pid of the sandbox's PID 1, hold a pidfd to it (killing it ends the sandbox)."""
    if run.info_fd is None or not _read_some(run.info_fd, run.info, 1 << 16):
        return
    os.close(run.info_fd)
    run.info_fd = None
    try:
        pid = int(json.loads(bytes(run.info))["child-pid"])
        if _exited(run.proc):  # bwrap reaped it already: the sandbox is gone and the pid may be reused
            return
        pidfd = os.pidfd_open(pid)
    except (ValueError, KeyError, TypeError, OSError, AttributeError):
        return
    if _parent_of(pid) == run.proc.pid:  # checked after opening: the pidfd now names that very process
        run.pidfd = pidfd
    else:
        os.close(pidfd)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _exited(proc: subprocess.Popen) -> bool:
    # WNOWAIT: look without reaping, so the pid (= process group id) stays ours until we killpg it.
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped elsewhere (SIGCHLD ignored by the host program)
        return True


def _finish(run: _Run) -> float:
    """Kill the run (the sandbox's PID 1 takes every process inside with it), wait until all are gone, clean
    up, and score what it reported."""
    if run.pidfd is not None:
        try:
            signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.killpg(run.proc.pid, signal.SIGKILL)  # the leader is not reaped yet: its pid is still ours
    except OSError:
        pass
    run.proc.wait()
    if run.pidfd is not None:
        select.select([run.pidfd], [], [], 10)  # readable once PID 1 exited, i.e. after the kernel killed the rest
        os.close(run.pidfd)
    _read_some(run.read_fd, run.report, MAX_REPORT_BYTES)
    for fd in (run.read_fd, run.info_fd):
        if fd is not None:
            os.close(fd)
    if run.workdir:
        shutil.rmtree(run.workdir, ignore_errors=True)
    return _score(run)


def _score(run: _Run) -> float:
    passed, seen, tag = 0, set(), run.nonce.encode()
    for line in bytes(run.report).split(b"\n"):
        nonce, _, rest = line.partition(b" ")
        index, _, payload = rest.partition(b" ")
        if nonce != tag or not index.isdigit() or int(index) in seen or int(index) >= len(run.units):
            continue
        seen.add(int(index))  # each test counts once: its first report
        passed += _judge(run.units[int(index)], payload)
    return passed / len(run.units)


def _grade(pending: list[tuple[int, str, list[Unit]]], python: str, isolation: str, limits: dict[str, int],
           timeout_s: float, concurrency: int, drop: bool = False, stderr: Any = subprocess.DEVNULL) -> list[float]:
    """Run rows (``(row, code, units)``) ``concurrency`` at a time from this thread; their scores in order."""
    queue, scores, running = deque(pending), {}, []
    try:
        while queue or running:
            while queue and len(running) < max(1, concurrency):
                running.append(_start(*queue.popleft(), python, isolation, limits, timeout_s, drop, stderr))
            time.sleep(_POLL_S)
            for run in list(running):
                _read_some(run.read_fd, run.report, MAX_REPORT_BYTES)
                _watch_sandbox(run)
                if _exited(run.proc) or time.monotonic() > run.deadline:
                    running.remove(run)
                    scores[run.row] = _finish(run)
    finally:
        for run in running:  # only on an exception (e.g. KeyboardInterrupt): leave nothing behind
            _finish(run)
    return [scores[row] for row, _, _ in pending]


def _can_drop_privileges(python: str) -> bool:
    """Unisolated only: whether we are root and ``python`` runs as nobody (not under a /root pyenv)."""
    return os.geteuid() == 0 and _probe_drop(python)


@lru_cache(maxsize=None)
def _probe_drop(python: str) -> bool:
    workdir = _make_workdir(drop=True)
    try:
        probe = subprocess.run([python, "-I", "-B", "-c", "pass"], cwd=workdir, env={}, timeout=30,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               user=SANDBOX_UID, group=SANDBOX_GID, extra_groups=[])
        return probe.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _allow_unisolated(sandbox: dict | None) -> bool:
    """The ``sandbox`` option (``{allow_unisolated: true}``), or ALIGNKIT_SANDBOX_ALLOW_UNISOLATED=1."""
    sandbox = {} if sandbox is None else sandbox
    if not isinstance(sandbox, dict) or set(sandbox) - {"allow_unisolated"} or \
            not isinstance(sandbox.get("allow_unisolated", False), bool):
        raise RecipeError(f"reward/code.py:unit_tests: sandbox={sandbox!r}; the one option is allow_unisolated, "
                          "true or false: {sandbox: {allow_unisolated: true}}")
    from_env = os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")
    return sandbox.get("allow_unisolated", False) or from_env


def unit_tests(completions: list, tests: list, *, timeout_s: float = 5.0, memory_mb: int = 1024,
               concurrency: int = 4, sandbox: dict | None = None, drop_privileges: bool = True,
               python: str | None = None, **kwargs: Any) -> list[float | None]:
    """Fraction of each row's ``tests`` that its completion's code passes, in a sandbox (see module doc).

    ``timeout_s`` is the wall-clock budget of one row (its sandbox is killed after it); ``memory_mb`` its
    address-space limit per process; ``concurrency`` how many rows run at once; ``sandbox``:
    ``{"allow_unisolated": True}`` runs the code even where no kernel isolation is available (else that is
    an error); ``drop_privileges`` (unisolated only) runs it as nobody when we are root and it can;
    ``python`` is the interpreter (default: ours, so the code sees the same installed packages).

    >>> unit_tests(["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b): return a - b"],
    ...            tests=["assert add(1, 2) == 3\\nassert add(0, 0) == 0"] * 2)
    [1.0, 0.5]
    """
    allow = _allow_unisolated(sandbox)
    python = python or sys.executable
    python = python if os.path.isabs(python) else shutil.which(python) or python
    scores: list[float | None] = [None] * len(completions)
    pending = []
    for row, (completion, row_tests) in enumerate(zip(completions, tests, strict=True)):
        units = parse_tests(row_tests)
        if units is None or not any(u.counted for u in units):
            logger.warning("unit_tests: row %d has no usable tests (%.60r); scored None", row, row_tests)
            continue
        pending.append((row, extract_code(completion_text(completion)), units))
    if not pending:
        return scores
    isolation = _choose_isolation(python, allow)
    drop = isolation == "none" and drop_privileges and _can_drop_privileges(python)
    limits = _limits(timeout_s, memory_mb, nproc=isolation != "none" or drop)
    for row, score in zip([row for row, _, _ in pending],
                          _grade(pending, python, isolation, limits, timeout_s, concurrency, drop)):
        scores[row] = score
    return scores


def single_tests(tests: Any) -> list[str] | None:
    """A row's tests as separate sources, each with all of the setup: what :func:`unit_tests` counts, one by one.

    >>> single_tests("import math\\nassert f(1) == 2\\nassert f(2) == 4")
    ['import math\\nassert f(1) == 2', 'import math\\nassert f(2) == 4']
    >>> single_tests(["assert f(1) == 2", "x = 3\\nassert f(x) == 6"])
    ['assert f(1) == 2', 'x = 3\\nassert f(x) == 6']
    """
    if isinstance(tests, (list, tuple)):
        return list(tests) if parse_tests(tests) is not None else None
    body = _parse(tests) if isinstance(tests, str) else None
    if body is None:
        return None
    setup = [ast.unparse(node) for node in body if not isinstance(node, ast.Assert)]
    return ["\n".join(setup + [ast.unparse(node)]) for node in body if isinstance(node, ast.Assert)]


def _unit_tests_feedback(completions: list, tests: list, *, most: int = 3, **options: Any) -> list[str | None]:
    """Which tests a completion's code failed (up to ``most``, as source), for a revision request (the
    ``rejection`` stage, Llama 3's execution feedback). Each test of a failing row runs again alone, in the same
    sandbox and limits (``options`` are :func:`unit_tests`'); None where every test passed or none is usable."""
    scores = unit_tests(completions, tests, **options)
    jobs = []  # (row, test source)
    for row, (score, row_tests) in enumerate(zip(scores, tests, strict=True)):
        if score is not None and score < 1.0:
            jobs += [(row, source) for source in single_tests(row_tests) or []]
    if not jobs:
        return [None] * len(completions)
    alone = unit_tests([completions[row] for row, _ in jobs], [source for _, source in jobs], **options)
    failed: dict[int, list[str]] = {}
    for (row, source), score in zip(jobs, alone, strict=True):
        if score is not None and score < 1.0:
            failed.setdefault(row, []).append(source.splitlines()[-1][:200])
    notes: list[str | None] = []
    for row in range(len(completions)):
        shown = failed.get(row, [])
        more = f" (and {len(shown) - most} more)" if len(shown) > most else ""
        notes.append(f"Failing tests: {'; '.join(shown[:most])}{more}." if shown else None)
    return notes


unit_tests.feedback = _unit_tests_feedback  # read by the rejection stage's revision requests
