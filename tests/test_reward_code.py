"""reward/code.py: scores of honest solutions, and hostile completions that must score 0 and harm nothing.

The hostile batch runs twice where possible: as root with only the in-process prelude (this machine's
pyenv interpreter cannot run as nobody), and with the privilege drop to uid 65534 (the system python can).
"""

from __future__ import annotations

import doctest
import inspect
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from alignkit.rewards import load_reward

unit_tests = load_reward("reward/code.py:unit_tests")
code = inspect.getmodule(unit_tests)
ADD_TESTS = "assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0\nassert add(2, 2) == 4"
SECRET = "hf_alignkit_test_secret_7f3a"


def test_docstring_examples() -> None:
    assert doctest.testmod(code).failed == 0


def test_extract_code_prefers_last_python_block() -> None:
    text = "```python\nx = 1\n```\nthen\n```\nplain\n```\nfinally\n```py\ny = 2\n```\n```bash\nls\n```"
    assert code.extract_code(text) == "y = 2\n"
    assert code.extract_code("```\nz = 3\n```") == "z = 3\n"
    assert code.extract_code("def f(): pass") == "def f(): pass"


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
    honest = "def add(a, b): return a + b"
    assert unit_tests([honest, honest], tests=[tests, broken]) == [1.0, 0.0]


def test_unusable_tests_score_none() -> None:
    honest = "def add(a, b): return a + b"
    assert unit_tests([honest] * 4, tests=[None, "x = 1", "assert (", ["assert add(1, 1) == 2", "assert ("]]) \
        == [None, None, None, None]


def test_main_guard_does_not_run_and_cwd_is_writable() -> None:
    completion = ("def add(a, b):\n    open('scratch.txt', 'w').write('ok')\n    return a + b\n"
                  "if __name__ == '__main__':\n    input()\n")
    assert unit_tests([completion], tests=[ADD_TESTS]) == [1.0]


def test_partial_credit_survives_a_later_hang() -> None:
    completion = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b"
    start = time.monotonic()
    assert unit_tests([completion], tests=[ADD_TESTS], timeout_s=1) == [0.75]
    assert time.monotonic() - start < 1 + 0.5


def _interpreters() -> list[str]:
    found = [sys.executable]
    system = shutil.which("python3", path="/usr/bin")
    if system and os.geteuid() == 0 and code._can_drop_privileges(system):
        found.append(system)
    return found


BOTH_MODES = pytest.mark.parametrize(
    "python", _interpreters(), ids=lambda p: "root-prelude" if p == sys.executable else "drop-to-nobody")


@pytest.fixture(scope="module")
def listener() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


@BOTH_MODES
def test_hostile_completions(python: str, listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    workdirs = Path(tempfile.mkdtemp(prefix="alignkit-test-"))
    workdirs.chmod(0o755)  # nobody must reach its working dir inside
    monkeypatch.setattr(tempfile, "tempdir", str(workdirs))  # where the sandbox makes its working dirs
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    tag = uuid.uuid4().hex
    outside = [Path(f"/tmp/alignkit-outside-{tag}"), Path.home() / f"alignkit-home-{tag}"]
    port = listener.getsockname()[1]
    honest = "def add(a, b):\n    return a + b\n"
    hostile = {
        "infinite loop": "while True:\n    pass\n" + honest,
        "fork bomb": "import os\nwhile True:\n    os.fork()\n" + honest,
        "fork bomb, errors swallowed":
            "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n",
        "subprocess": f"import subprocess\nsubprocess.run(['touch', '{outside[0]}'])\n" + honest,
        "10 GB allocation": "x = bytearray(10 * 1024 ** 3)\n" + honest,
        "write /tmp": f"open('{outside[0]}', 'w').write('x')\n" + honest,
        "write home": f"import pathlib\npathlib.Path('{outside[1]}').write_text('x')\n" + honest,
        "os.open outside": f"import os\nos.close(os.open('{outside[0]}', os.O_WRONLY | os.O_CREAT))\n" + honest,
        "symlink out": f"import os\nos.symlink('{outside[0]}', 'link')\nopen('link', 'w').write('x')\n" + honest,
        "env secret": "import os\ndef add(a, b):\n    return a + b if os.environ.get('HF_TOKEN') else None\n",
        "parent environ": "import os\nenv = open(f'/proc/{os.getppid()}/environ', 'rb').read()\n"
                          f"def add(a, b):\n    return a + b if b'{SECRET}' in env else None\n",
        "socket connect": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                          "s.sendall(b'leak')\n" + honest,
        "raw _socket": f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))\n" + honest,
        "ctypes": "import ctypes\n" + honest,
        "raise limits": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n" + honest,
        "forge results": "import os\nfor fd in range(3, 300):\n    try:\n"
                         "        os.write(fd, b'0' * 32 + b' 0 1\\n')\n    except OSError:\n        pass\n"
                         "def add(a, b):\n    return -7\n",
        "exit early": "import os\ndef add(a, b):\n    os._exit(0)\n",
    }
    start = time.monotonic()
    scores = unit_tests(list(hostile.values()), tests=[ADD_TESTS] * len(hostile), timeout_s=1, concurrency=4,
                        python=python)
    elapsed = time.monotonic() - start
    monkeypatch.undo()
    leftovers = list(workdirs.iterdir())
    workdirs.rmdir()
    assert dict(zip(hostile, scores)) == {name: 0.0 for name in hostile}
    # two rows hang until the 1 s deadline (loop, swallowed fork bomb); the rest fail fast
    assert elapsed < 1 + 4
    assert leftovers == []  # every working directory was deleted
    for path in outside:
        assert not path.exists(), f"{path} was created by sandboxed code"
    with pytest.raises(TimeoutError):
        listener.accept()  # nobody connected


def test_noise_and_legit_work_still_pass() -> None:
    loud = "for i in range(10 ** 6):\n    print(i)\ndef add(a, b):\n    return a + b\n"
    uses_asyncio = ("import asyncio\nasync def twice(x):\n    return x + x\n"
                    "def add(a, b):\n    return asyncio.run(twice(a)) // 2 + b\n")
    start = time.monotonic()
    assert unit_tests([loud, uses_asyncio], tests=[ADD_TESTS] * 2, timeout_s=4) == [1.0, 1.0]
    assert time.monotonic() - start < 4 + 1.0


@BOTH_MODES
def test_calling_process_survives_kill_parent(python: str) -> None:
    # The grader runs in its own process here so that, were the kill to land, this test fails, not the session.
    script = (
        "from alignkit.rewards import load_reward\n"
        "unit_tests = load_reward('reward/code.py:unit_tests')\n"
        "kill = 'import os, signal\\nos.kill(os.getppid(), signal.SIGKILL)\\n'\n"
        "group = 'import os, signal\\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)'\n"
        f"print(unit_tests([kill, group], tests=['assert add(1, 2) == 3'] * 2, python={python!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[0.0, 0.0]"
