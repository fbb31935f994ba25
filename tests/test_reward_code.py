"""reward/code.py: honest solutions score their fraction; hostile completions score 0 and harm nothing.

The hostile catalogue (escape attempts and fake passes) is graded the way a user grades: ``alignkit grade`` in
its own process and session, started with ``HF_TOKEN`` in its environment. Afterwards nothing it could reach
may have changed: a sentinel folder, the home folder, a loopback TCP and an abstract unix listener, the process
table. It runs once per isolation mode this machine has (see docs/sandbox.md).
"""

from __future__ import annotations

import doctest
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from alignkit.core.errors import AlignkitError
from alignkit.rewards.programs import RewardSpec, bind_reward, load_reward

unit_tests = load_reward("reward/code.py:unit_tests")
code = inspect.getmodule(unit_tests)
REPO = Path(__file__).resolve().parents[1]
ADD_TESTS = "assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0\nassert add(2, 2) == 4"
SECRET = "hf_alignkit_test_secret_7f3a"
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return -7\n"  # fails all four ADD_TESTS


@pytest.fixture(autouse=True)
def _unisolated_where_no_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where this machine has no kernel isolation (docs/sandbox.md), the honest tests still run, unisolated
    (their code is ours); the hostile catalogue is skipped."""
    if not any(code.isolation_works(isolation, sys.executable) for isolation in code.ISOLATIONS):
        monkeypatch.setenv(code.ALLOW_ENV, "1")


def test_docstring_examples() -> None:
    assert doctest.testmod(code).failed == 0


def test_extract_code_prefers_last_python_block() -> None:
    text = "```python\nx = 1\n```\nthen\n```\nplain\n```\nfinally\n```py\ny = 2\n```\n```bash\nls\n```"
    assert code.extract_code(text) == "y = 2\n"
    assert code.extract_code("```\nz = 3\n```") == "z = 3\n"
    assert code.extract_code("def f(): pass") == "def f(): pass"


# ---------------------------------------------------------------------------------------------- honest work


def test_scores_fraction_of_tests_passed() -> None:
    completions = [
        "Sure:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",  # passes all 4
        "def add(a, b):\n    return a + b + (a == 2)",  # fails add(2, 2) only: 3/4
        "def add(a, b):\n    return a + b if a > 0 else 1",  # fails the two with a <= 0: 2/4
        "def add(a, b):\n    return a - b",  # passes add(0, 0) only: 1/4
        "def add(a, b)\n    return a + b",  # syntax error: 0
        [{"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
    ]
    scores = unit_tests(completions, tests=[ADD_TESTS] * len(completions), timeout_s=5)
    assert scores == [1.0, 0.75, 0.5, 0.25, 0.0, 1.0]


def test_half_the_tests_and_list_form() -> None:
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
    assert unit_tests(["def add(a, b): return 3"], tests=[tests]) == [0.5]


def test_setup_statements_and_failed_setup() -> None:
    tests = "import math\nassert add(1, 1) == 2\nassert math.isclose(add(0.1, 0.2), 0.3)"
    broken = "from nowhere import thing\nassert add(1, 1) == 2"
    assert unit_tests([RIGHT, RIGHT], tests=[tests, broken]) == [1.0, 0.0]


def test_unusable_tests_score_none() -> None:
    assert unit_tests([RIGHT] * 4, tests=[None, "x = 1", "assert (", ["assert add(1, 1) == 2", "assert ("]]) \
        == [None, None, None, None]


def test_main_guard_does_not_run_and_cwd_is_writable() -> None:
    completion = ("def add(a, b):\n    open('scratch.txt', 'w').write('ok')\n    return a + b\n"
                  "if __name__ == '__main__':\n    input()\n")
    assert unit_tests([completion], tests=[ADD_TESTS]) == [1.0]


def test_partial_credit_survives_a_later_hang() -> None:
    completion = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b"
    start = time.monotonic()
    assert unit_tests([completion], tests=[ADD_TESTS], timeout_s=1) == [0.75]
    assert time.monotonic() - start < 1 + 1.0


HONEST = {  # name: (completion, tests, expected score)
    "numpy scalars and arrays": (
        "import numpy as np\ndef total(xs):\n    return np.sum(np.array(xs))\n"
        "def mean(xs):\n    return np.mean(xs)\ndef evens(xs):\n    return np.array(xs)[::2].tolist()\n",
        "assert total([1, 2, 3]) == 6\nassert mean([1, 2]) == 1.5\nassert evens([1, 2, 3]) == [1, 3]\n"
        "assert total([]) == 0", 1.0),
    "recursion and lru_cache": (
        "from functools import lru_cache\n@lru_cache(None)\ndef fib(n):\n"
        "    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "assert fib(10) == 55\nassert fib(90) == 2880067194370816120\nassert fib(0) == 0", 1.0),
    "class with a method": (
        "class Solution:\n    def twice(self, xs):\n        return [2 * x for x in xs]\n",
        "assert Solution().twice([1, 2]) == [2, 4]\nassert Solution().twice([]) == []", 1.0),
    "floats, None, bools, tuples, dicts, sets": (
        "from collections import Counter, namedtuple\nPair = namedtuple('Pair', 'lo hi')\n"
        "def avg(xs):\n    return sum(xs) / len(xs) if xs else None\n"
        "def is_even(n):\n    return n % 2 == 0\n"
        "def span(xs):\n    return Pair(min(xs), max(xs))\n"
        "def counts(s):\n    return Counter(s)\n"
        "def uniq(xs):\n    return set(xs)\n",
        "assert avg([1, 2]) == 1.5\nassert avg([]) is None\nassert is_even(4) == True\nassert is_even(3) is False\n"
        "assert not is_even(5)\nassert span([3, 1, 2]) == (1, 3)\nassert counts('aab') == {'a': 2, 'b': 1}\n"
        "assert uniq([1, 1, 2]) == {1, 2}\nassert 2 in uniq([2])\nassert avg([1, 1]) != 2", 1.0),
    "strings, bytes, ranges, chained and boolean asserts": (
        "def rev(s):\n    return s[::-1]\ndef enc(s):\n    return s.encode()\ndef upto(n):\n    return range(n)\n",
        "assert rev('abc') == 'cba'\nassert enc('hi') == b'hi'\nassert upto(3) == range(3)\n"
        "assert 0 <= len(rev('ab')) < 3\nassert rev('a') == 'a' and rev('ab') == 'ba'\n"
        "assert rev('xy') == rev(rev('yx'))", 1.0),
    "expected value in a variable": (
        RIGHT, "expected = [3, 0]\nassert [add(1, 2), add(0, 0)] == expected\nassert add(2, 2) == expected[0]", 0.5),
    "stdlib imports, big ints, nan and inf": (
        "import itertools, math\ndef pairs(n):\n    return list(itertools.combinations(range(n), 2))\n"
        "def big(n):\n    return 2 ** n\ndef weird():\n    return [math.inf, -0.0]\n",
        "assert pairs(3) == [(0, 1), (0, 2), (1, 2)]\nassert big(20000) == 2 ** 20000\n"
        "assert weird() == [float('inf'), 0.0]", 1.0),
    "list form with statements": (
        RIGHT, ["x = add(1, 2)\nassert x == 3", "assert add(1, 1) == 2\nassert add(5, 5) == 11", "add(1, 2)"], 2 / 3),
    "nested asserts are still run": (
        RIGHT, ["for a in range(3):\n    assert add(a, 0) == a", "for a in range(3):\n    assert add(a, 1) == a"],
        0.5),
}


def test_honest_solutions_pass() -> None:
    names = list(HONEST)
    scores = unit_tests([HONEST[n][0] for n in names], tests=[HONEST[n][1] for n in names], timeout_s=10)
    assert dict(zip(names, scores)) == {n: HONEST[n][2] for n in names}


def test_noise_and_legit_work_still_pass() -> None:
    loud = "for i in range(10 ** 6):\n    print(i)\ndef add(a, b):\n    return a + b\n"
    uses_asyncio = ("import asyncio\nasync def twice(x):\n    return x + x\n"
                    "def add(a, b):\n    return asyncio.run(twice(a)) // 2 + b\n")
    uses_threads = ("from concurrent.futures import ThreadPoolExecutor\n"
                    "def add(a, b):\n    with ThreadPoolExecutor(2) as pool:\n"
                    "        return pool.submit(sum, [a, b]).result()\n")
    uses_tmp = ("import tempfile, os\ndef add(a, b):\n    with tempfile.NamedTemporaryFile('w+') as f:\n"
                "        f.write(str(a + b)); f.flush(); f.seek(0)\n        return int(f.read())\n")
    start = time.monotonic()
    assert unit_tests([loud, uses_asyncio, uses_threads, uses_tmp], tests=[ADD_TESTS] * 4, timeout_s=5) \
        == [1.0, 1.0, 1.0, 1.0]
    assert time.monotonic() - start < 5 + 1.0


def test_expected_literals_never_reach_the_child() -> None:
    units = code.parse_tests("assert add(1, 2) == 987654321\nassert 123456789 == add(2, 2)\n"
                             "assert add(3, 3) in [555555555]")
    shipped = json.dumps(code.child_units(units))
    for literal in ("987654321", "123456789", "555555555"):
        assert literal not in shipped
    assert "add(1, 2)" in shipped


# ------------------------------------------------------------------------------------------------- hostile

# Helpers shared by hostile completions: recover the real function a wrapper closes over (today's Python
# prelude wrapped open, os.unlink, ... in closures), and a module re-created from its spec (pristine).
HELPERS = '''
import builtins, importlib.util, os, sys
def real(fn, name):
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        if callable(value) and getattr(value, "__name__", None) == name:
            return value
    return fn
def fresh(name):
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
real_open = real(builtins.open, "open")
def attempt(fn):
    try:
        return fn()
    except BaseException:
        return None
'''


def hostile_catalogue(sentinel: Path, home_file: Path, port: int, abstract: str, marker: str) -> dict:
    """name: (completion, tests). Every completion is wrong unless its hack works: each must score 0."""
    got = "def add(a, b):\n    return a + b if ok else -7\n"  # right only if the hack (ok) worked
    subs = {"SENTINEL": str(sentinel), "HOME_FILE": str(home_file), "PORT": str(port), "ABSTRACT": abstract,
            "MARKER": marker, "SECRET": SECRET, "REPO": str(REPO)}

    def fill(text: str) -> str:
        for key, value in subs.items():
            text = text.replace(key, value)
        return text

    rows = {
        "HF_TOKEN from os.environ": "import os\nok = 'HF_TOKEN' in os.environ or 'SECRET' in str(os.environ)\n" + got,
        "HF_TOKEN from /proc/<ppid>/environ via the real open": HELPERS +
            "ok = b'SECRET' in (attempt(lambda: real_open(f'/proc/{os.getppid()}/environ', 'rb').read()) or b'')\n"
            + got,
        "HF_TOKEN from any /proc/*/environ": HELPERS +
            "ok = any(b'SECRET' in (attempt(lambda: real_open(f'/proc/{p}/environ', 'rb').read()) or b'')\n"
            "         for p in os.listdir('/proc') if p.isdigit())\n" + got,
        "write and delete outside via the real open and unlink": HELPERS +
            "attempt(lambda: real_open('SENTINEL/pwned', 'w').write('x'))\n"
            "attempt(lambda: real(os.unlink, 'unlink')('SENTINEL/keep'))\n"
            "attempt(lambda: real_open('HOME_FILE', 'w').write('x'))\n"
            "attempt(lambda: real_open('/dev/shm/MARKER', 'w').write('x'))\n"
            "ok = os.path.exists('SENTINEL/pwned')\n" + got,
        "os.open and a symlink out of the working folder": HELPERS +
            "attempt(lambda: os.close(real(os.open, 'open')('SENTINEL/by-os-open', os.O_WRONLY | os.O_CREAT)))\n"
            "attempt(lambda: os.symlink('HOME_FILE', 'link'))\n"
            "attempt(lambda: real_open('link', 'w').write('x'))\n" + WRONG,
        "TCP socket through _socket.socket.__mro__[1]":
            "import _socket\ncls = _socket.socket\ncls = cls.__mro__[1] if cls.__mro__[1] is not object else cls\n"
            "s = cls()\ns.settimeout(2)\ns.connect(('127.0.0.1', PORT))\ns.sendall(b'leak')\nok = True\n" + got,
        "abstract unix socket through the real class":
            "import _socket\ncls = _socket.socket\ncls = cls.__mro__[1] if cls.__mro__[1] is not object else cls\n"
            "s = cls(_socket.AF_UNIX, _socket.SOCK_STREAM)\ns.settimeout(2)\ns.connect('\\0ABSTRACT')\nok = True\n"
            + got,
        "child surviving grading via a fresh posix and setsid": HELPERS +
            "posix = fresh('posix')\nif posix.fork() == 0:\n    posix.setsid()\n"
            "    posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', 'MARKER'])\n"
            "import time\ntime.sleep(0.3)  # let the child reach setsid before grading ends\n" + WRONG,
        "subprocess touching the home folder":
            "import subprocess\nsubprocess.run(['touch', 'HOME_FILE'])\n" + WRONG,
        "replaced builtins.compile": "import builtins\n_compile = builtins.compile\n"
            "builtins.compile = lambda src, name, mode, *a, **k: _compile('pass' if mode == 'exec' else 'True', "
            "name, mode, *a, **k)\n" + WRONG,
        "replaced builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\n" + WRONG,
        "replaced builtins.eval": "import builtins\nbuiltins.eval = lambda *a, **k: True\n" + WRONG,
        "always-equal object": "class Equal:\n    def __eq__(self, other):\n        return True\n"
            "    def __ne__(self, other):\n        return False\n    __hash__ = object.__hash__\n"
            "def add(a, b):\n    return Equal()\n",
        "int subclass that is always equal": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
            "    def __ne__(self, other):\n        return False\n    __hash__ = int.__hash__\n"
            "def add(a, b):\n    return Int(-7)\n",
        "fake results written to every fd, then os._exit(0)":
            "import os, sys\nnonce, frame = None, sys._getframe()\nwhile frame is not None:\n"
            "    for value in list(frame.f_locals.values()):\n"
            "        if isinstance(value, str) and len(value) == 32 and all(c in '0123456789abcdef' for c in value):\n"
            "            nonce = value\n    frame = frame.f_back\n"
            "for fd in range(3, 256):\n    for i in range(16):\n"
            "        for line in (f'{nonce} {i} 1\\n', f'{nonce} {i} [true]\\n', f'{nonce} {i} true\\n'):\n"
            "            try:\n                os.write(fd, line.encode())\n            except OSError:\n"
            "                pass\nos._exit(0)\n",
        "expected values read from the harness or the tests file": HELPERS +
            "import glob, re\ntext, frame = '', sys._getframe()\nwhile frame is not None:\n"
            "    text += repr(frame.f_locals)\n    frame = frame.f_back\n"
            "for path in filter(os.path.isfile, glob.glob('*') + glob.glob('/tmp/*') + glob.glob('/proc/self/fd/*')):\n"
            "    text += str(attempt(lambda: real_open(path, errors='replace').read()))\n"
            "found = re.findall(r'add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', text)\n"
            "table = {(int(a), int(b)): int(c) for a, b, c in found}\n"
            "def add(a, b):\n    return table.get((a, b), -7)\n",
        "fork bomb": "import os\nwhile True:\n    os.fork()\n",
        "fork bomb, errors swallowed": "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n"
            "        pass\n",
        "memory hog": "x = bytearray(10 * 1024 ** 3)\n" + RIGHT,
        "raise the limits, then hog": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n"
            "x = bytearray(10 * 1024 ** 3)\n" + RIGHT,
        "fill the scratch space": "for i in range(8):\n    open(f'big{i}', 'wb').write(bytes(16 << 20))\n" + RIGHT,
        "infinite loop": "while True:\n    pass\n" + RIGHT,
        "flood every fd": "import os\nfor fd in range(64):\n    try:\n        os.write(fd, b'1\\n' * (1 << 19))\n"
            "    except OSError:\n        pass\n" + WRONG,
        "kill the parent and its group": HELPERS + "import signal\nposix = fresh('posix')\n"
            "attempt(lambda: posix.kill(os.getppid(), signal.SIGKILL))\n"
            "attempt(lambda: posix.killpg(posix.getpgid(os.getppid()), signal.SIGKILL))\n" + WRONG,
        "read host secrets: /root, /etc/shadow": HELPERS +
            "ok = bool(attempt(lambda: os.listdir('/root/.cache') or os.listdir('/root/.pyenv/..')))\n"
            "ok = ok or any(attempt(lambda: real_open(p).read()) for p in ('/root/.bashrc', '/etc/shadow'))\n" + got,
        "read the repository": HELPERS + "ok = bool(attempt(lambda: real_open('REPO/pyproject.toml').read()))\n" + got,
        "exit early": "import os\ndef add(a, b):\n    os._exit(0)\n",
        "sys.exit at import": "import sys\nsys.exit(0)\n" + RIGHT,
    }
    rows = {name: (fill(text), ADD_TESTS) for name, text in rows.items()}
    # a test computed in the child (abs): replacing builtins.abs must not turn it true
    rows["replaced builtins.abs"] = ("import builtins\nbuiltins.abs = lambda x: 0\n" + WRONG,
                                     "assert abs(add(1, 2) - 3) < 1e-9\nassert abs(add(2, 2) - 4) < 1e-9")
    return rows


def _marked_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _sandboxes() -> list[tuple[str, str]]:
    """(isolation, interpreter) pairs that work here, one per isolation mode: ours first, else the system's
    (a root-only interpreter such as pyenv under /root cannot serve the user-namespace mode)."""
    pythons = [sys.executable] + [p for p in ("/usr/bin/python3",) if os.path.exists(p)]
    found = []
    for isolation in code.ISOLATIONS:
        working = [p for p in pythons if code.isolation_works(isolation, p)]
        if working:
            found.append((isolation, working[0]))
    return found or [("none", sys.executable)]


# Grades a json list of [completion, tests] with another interpreter inside the sandbox (fast deadline).
GRADER = """
import json, sys
from alignkit.rewards.programs import load_reward
rows = json.load(open(sys.argv[1]))
scores = load_reward('reward/code.py:unit_tests')([c for c, t in rows], tests=[t for c, t in rows], timeout_s=2,
                                                 python=sys.argv[2])
print(json.dumps(scores))
"""


@pytest.fixture
def listeners():
    tcp = socket.create_server(("127.0.0.1", 0))
    abstract = f"alignkit-test-{uuid.uuid4().hex}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + abstract)
    unix.listen()
    for s in (tcp, unix):
        s.settimeout(0.2)
    yield tcp, unix, abstract
    tcp.close()
    unix.close()


@pytest.mark.parametrize("isolation, python", _sandboxes(), ids=lambda v: os.path.basename(v))
def test_hostile_completions_score_zero_and_harm_nothing(isolation: str, python: str, listeners,
                                                         tmp_path: Path) -> None:
    """With our interpreter, through ``alignkit grade`` as a user would; with another, through unit_tests."""
    if isolation == "none":
        if os.environ.get("CI"):  # CI installs bubblewrap (make test): a skip there would hide a broken sandbox
            pytest.fail("no kernel isolation in CI: bubblewrap missing or unusable (see docs/sandbox.md)")
        pytest.skip("no kernel isolation on this machine (see docs/sandbox.md); hostile code is not run")
    tcp, unix, abstract = listeners
    tag = uuid.uuid4().hex
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep").write_text("intact")
    home_file = Path.home() / f"alignkit-home-{tag}"
    marker = f"alignkit-marker-{tag}"
    rows = hostile_catalogue(sentinel, home_file, tcp.getsockname()[1], abstract, marker)
    data = tmp_path / "hostile.jsonl"
    data.write_text("".join(json.dumps({"completion": c, "tests": t}) + "\n" for c, t in rows.values()))
    (tmp_path / "hostile.json").write_text(json.dumps(list(rows.values())))
    temp_before = set(Path(tempfile.gettempdir()).glob("alignkit-code-*"))
    env = {**os.environ, "HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET, "ALIGNKIT_SANDBOX_ISOLATION": isolation}
    env.pop("ALIGNKIT_SANDBOX_ALLOW_UNISOLATED", None)
    if python == sys.executable:
        argv = [sys.executable, "-m", "alignkit", "grade", str(data), "--reward", "reward/code.py:unit_tests",
                "--answer-field", "none"]
    else:
        argv = [sys.executable, "-c", GRADER, str(tmp_path / "hostile.json"), python]
    start = time.monotonic()
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)  # its own session: a kill aimed at its group spares pytest
    elapsed = time.monotonic() - start
    survivors = _marked_processes(marker)
    for pid in survivors:  # clean up after a failing run: these are the catalogue's own processes
        os.kill(pid, signal.SIGKILL)
    created = [p for p in (home_file, Path("/dev/shm") / marker) if p.exists()]
    for path in created:
        path.unlink()
    assert done.returncode == 0, done.stdout + done.stderr
    if python == sys.executable:
        graded = (tmp_path / "hostile.graded.jsonl").read_text().splitlines()
        scores = [json.loads(line)["score"] for line in graded]
    else:
        scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert dict(zip(rows, scores)) == {name: 0.0 for name in rows}
    assert survivors == [], "a sandboxed process outlived grading"
    assert sorted(p.name for p in sentinel.iterdir()) == ["keep"] and (sentinel / "keep").read_text() == "intact"
    assert created == [], "files were created outside the sandbox"
    assert set(Path(tempfile.gettempdir()).glob("alignkit-code-*")) == temp_before
    for server in (tcp, unix):
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
    assert elapsed < 60


# ---------------------------------------------------------------------------------------- refusal / opt-in


def _no_isolation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a machine where no isolation works (as in a default docker container)."""
    monkeypatch.setattr(code, "_probe", lambda isolation, python, euid: "simulated: namespaces not permitted")
    monkeypatch.delenv(code.ALLOW_ENV, raising=False)
    monkeypatch.delenv(code.ISOLATION_ENV, raising=False)


def test_refuses_without_isolation_in_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_isolation(monkeypatch)
    with pytest.raises(AlignkitError) as caught:
        unit_tests([RIGHT], tests=[ADD_TESTS])
    message = str(caught.value)
    assert "\n" not in message and "simulated: namespaces not permitted" in message and "--privileged" in message
    assert "kwargs: {sandbox: {allow_unisolated: true}}" in message and "ALIGNKIT_SANDBOX_ALLOW_UNISOLATED=1" in message
    monkeypatch.setattr(code, "_bwrap", lambda: None)
    with pytest.raises(AlignkitError, match=r"\(bwrap is not installed\); install bubblewrap \(apt-get install"):
        unit_tests([RIGHT], tests=[ADD_TESTS])
    assert unit_tests([RIGHT], tests=[None]) == [None]  # nothing to run: nothing refused
    monkeypatch.setenv(code.ISOLATION_ENV, "chroot")
    with pytest.raises(AlignkitError, match="bwrap-userns"):
        unit_tests([RIGHT], tests=[ADD_TESTS], sandbox={"allow_unisolated": True})


def test_allow_unisolated_runs_honest_code_and_judges_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_isolation(monkeypatch)
    temp_before = set(Path(tempfile.gettempdir()).glob("alignkit-code-*"))
    partial = "def add(a, b):\n    return a + b if a > 0 else 1"
    assert unit_tests([RIGHT, partial], tests=[ADD_TESTS] * 2, sandbox={"allow_unisolated": True}) == [1.0, 0.5]
    monkeypatch.setenv(code.ALLOW_ENV, "1")
    assert unit_tests([RIGHT], tests=[ADD_TESTS]) == [1.0]
    fakes = list(HOSTILE_FAKES.values())
    assert unit_tests(fakes, tests=[ADD_TESTS] * len(fakes), timeout_s=2) == [0.0] * len(fakes)
    assert set(Path(tempfile.gettempdir()).glob("alignkit-code-*")) == temp_before  # working dirs deleted


HOSTILE_FAKES = {  # fake passes that need no escape: scored 0 even without kernel isolation
    "always equal": "class E:\n    __eq__ = lambda self, other: True\n    __hash__ = object.__hash__\n"
                    "def add(a, b):\n    return E()\n",
    "replaced exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\n" + WRONG,
    "replaced compile": "import builtins\nbuiltins.compile = lambda *a, **k: None\n" + WRONG,
}


def test_recipe_spelling_binds_the_sandbox_option() -> None:
    spec = RewardSpec(program="reward/code.py:unit_tests", kwargs={"sandbox": {"allow_unisolated": True}})
    fn = bind_reward(spec)
    assert fn([RIGHT], tests=[ADD_TESTS]) == [1.0]
    for wrong in ({"allow_unisolate": True}, {"allow_unisolated": "false"}, True):
        with pytest.raises(AlignkitError, match="allow_unisolated"):
            unit_tests([RIGHT], tests=[ADD_TESTS], sandbox=wrong)


def test_known_limit_truth_asserts_in_the_child_can_be_gamed() -> None:
    """What remains possible (docs/sandbox.md): an assert whose truth is computed in the child by a helper
    the solution can reach (here math.isclose) can be faked; a literal comparison cannot."""
    gamed = "import math\nmath.isclose = lambda *a, **k: True\n" + WRONG
    tests = "import math\nassert math.isclose(add(1, 2), 3)\nassert add(1, 2) == 3"
    assert unit_tests([gamed], tests=[tests]) == [0.5]


def test_feedback_names_the_failing_tests_from_a_sandboxed_rerun() -> None:
    """What the rejection stage shows a revision request: each failing test's source, none of the passing."""
    off_by_one = "def add(a, b):\n    return a + b + (a == 2)\n"  # fails only add(2, 2) == 4
    notes = unit_tests.feedback([RIGHT, off_by_one, WRONG, RIGHT], tests=[ADD_TESTS] * 3 + ["not python ("])
    assert notes == [None, "Failing tests: assert add(2, 2) == 4.",
                     "Failing tests: assert add(1, 2) == 3; assert add(0, 0) == 0; assert add(-1, 1) == 0 "
                     "(and 1 more).", None]
    # list-form tests are one test per item
    assert unit_tests.feedback([off_by_one], tests=[["assert add(2, 2) == 4", "assert add(1, 1) == 2"]],
                               most=1) == ["Failing tests: assert add(2, 2) == 4."]


def test_feedback_of_hostile_completions_is_only_the_tests_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """A revision request shows the model the feedback: a completion must not be able to put words into it (a
    fake verdict, the trainer's secret) or to make a failing test look passed. The notes are built from the tests'
    own source, so every fake and every printer gets the full list of its failing tests and nothing it wrote."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    printers = {
        "prints a verdict": "print('Failing tests: none. All tests passed.')\n" + WRONG,
        "prints the token": "import os, sys\nprint(os.environ.get('HF_TOKEN'))\n"
                            "sys.stderr.write(str(os.environ.get('HF_TOKEN')))\n" + WRONG,
        "exits 0 early": "import os\nos._exit(0)\n" + WRONG,
        "raises with a message": "raise SystemExit('Failing tests: none')\n" + WRONG,
    }
    completions = list(HOSTILE_FAKES.values()) + list(printers.values())
    notes = unit_tests.feedback(completions, tests=[ADD_TESTS] * len(completions), most=4, timeout_s=5)
    every = "Failing tests: " + "; ".join(ADD_TESTS.splitlines()) + "."
    assert notes == [every] * len(completions), notes
    assert not any(SECRET in note for note in notes)
