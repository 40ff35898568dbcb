"""A real `qwenmlx serve` process for the server tests, and the plain helpers they share."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest

API_KEY = "test-key"
ORIGIN = "http://ui.example"
MAX_QUEUE = 8
MAX_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, body as JSON or text) of one plain HTTP request."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, head, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, head, body = e.code, e.headers, e.read()
    try:
        return status, head, json.loads(body)
    except json.JSONDecodeError:
        return status, head, body.decode()


def wait_until_healthy(url: str, process: subprocess.Popen | None, log: Path | None, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"the server exited:\n{log.read_text()}")
        try:
            healthy = http(f"{url}/health")[0] == 200
        except OSError:  # not listening yet
            healthy = False
        if healthy:
            return
        time.sleep(0.2)
    pytest.fail("the server did not become healthy")


@dataclass
class Server:
    url: str
    log: Path

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0)

    def anthropic_client(self, **kwargs) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=self.url, api_key=API_KEY, max_retries=0, **kwargs)

    def log_line(self, request_id: str) -> str:
        """The request's one line in the log, once written: a cancelled request's is written when the engine
        notices, which may be after the client's next request is answered."""
        return self.wait_for_lines(f"{re.escape(request_id)}:", 1)[0]

    def log_lines(self, pattern: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if re.search(pattern, line)]

    def wait_for_lines(self, pattern: str, count: int, limit: float = 60) -> list[str]:
        """The log's lines that match pattern, once there are `count` of them (failing after `limit` seconds)."""
        deadline = time.monotonic() + limit
        while len(lines := self.log_lines(pattern)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lines) == count, self.log.read_text()
        return lines

    def wait_until_idle(self, limit: float = 60) -> None:
        """Until nothing runs or waits (the lines of requests that ended are written by then)."""
        deadline = time.monotonic() + limit
        while (health := http(f"{self.url}/health")[2])["running"] or health["waiting"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)


@contextlib.contextmanager
def running_server(moe_dir: Path, log: Path, *options: str) -> Iterator[Server]:
    """`qwenmlx serve` on the tiny MoE in a subprocess, with the test hooks on, until the block ends."""
    port = free_port()
    command = [sys.executable, "-m", "qwenmlx", "serve", "-m", str(moe_dir), "--port", str(port),
               "--api-key", API_KEY, "--no-memory-check", *options]  # tiny models; the machine may be busy
    with open(log, "a") as out:
        # QWENMLX_HOME: the default prompt cache on disk goes beside the log, not into the user's models directory
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "QWENMLX_TEST_HOOKS": "1", "QWENMLX_HOME": str(log.parent)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield Server(url, log)
    finally:
        process.terminate()
        process.wait(timeout=30)


def script(reply: str = "", fail: str | None = None) -> dict:
    """extra_headers that make the model say `reply` (or fail as if out of memory)."""
    return {"x-qwenmlx-test-script": json.dumps({"fail": fail} if fail else {"reply": reply})}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
