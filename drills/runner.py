"""An operation runner: one `boxoffice` subprocess (switchover, event move, event create).

Operations run as processes, as an operator's would, so that a fault can SIGKILL or
SIGSTOP the runner itself (drills/faults.py `kill-runner`, `pause-runner`): a runner
is a process that can die or freeze at any instant. Its output is collected line by
line; with `--json` its answer is the JSON document it printed. `finish(timeout)`
waits for it and kills it past the timeout (a runner still working long after every
fault was healed is itself a finding).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

from drills.checks import Step
from drills.places import signal_pid


class OperationRunner:
    """One `boxoffice` subprocess: an operation runner that faults can kill or pause."""

    def __init__(self, state_dir: Path, argv: list[str], what: str, step: Step) -> None:
        self.args = list(argv)  # the `boxoffice` arguments (to send the same request again)
        self.argv = [sys.executable, "-m", "deploy.cli", "--state-dir", str(state_dir), *argv]
        self.what = what
        self.step = step  # what it is for the final checks, until it answers
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL)
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.output.append(line.decode(errors="replace").rstrip())

    async def finish(self, timeout: float) -> tuple[int | None, bool]:
        """Its exit code; True when it had to be killed after `timeout` seconds."""
        assert self.proc is not None and self._reader is not None
        killed = False
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            killed = True
            signal_pid(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode, killed

    def answer(self) -> dict[str, Any]:
        """The JSON document it printed last ({} if none)."""
        text = "\n".join(self.output)
        start = text.find("{")
        with contextlib.suppress(ValueError):
            doc = json.loads(text[start:]) if start >= 0 else {}
            return doc if isinstance(doc, dict) else {}
        return {}
