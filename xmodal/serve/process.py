"""Run ``xmodal serve`` as a real server process (for tests and the load benchmark).

``ServerProcess`` starts ``python -m xmodal serve DIR --port 0 ...``, reads the bound address from its
stderr, waits until ``/healthz`` answers, and always stops the process on exit (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import httpx

_LISTENING = re.compile(r"listening on (http://\S+?):(\d+)/")


class ServerProcess:
    """Context manager around one ``xmodal serve`` subprocess; ``url`` is its base URL once entered."""

    def __init__(self, model_dir: str | Path, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 start_timeout: float = 120.0) -> None:
        self.model_dir = Path(model_dir)
        self.args = list(args)
        self.env = env
        self.start_timeout = start_timeout
        self.url = ""
        self.lines: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()

    def __enter__(self) -> "ServerProcess":
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "xmodal", "serve", str(self.model_dir), "--port", "0", *self.args]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      text=True, env=env)
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self.lines.append(line.rstrip("\n"))
            match = _LISTENING.search(line)
            if match and not self.url:
                self.url = f"{match.group(1)}:{match.group(2)}"
                self._ready.set()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while not self._ready.wait(0.1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)  # let the reader thread collect the last lines
                raise RuntimeError(f"xmodal serve did not start (exit code {self._proc.poll()}):\n" + self.log())
        with httpx.Client(timeout=2.0) as client:
            while True:
                try:
                    if client.get(self.url + "/healthz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("xmodal serve never answered /healthz:\n" + self.log())
                time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self) -> int | None:
        """SIGTERM, wait up to 10 s, then SIGKILL; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        return proc.returncode
