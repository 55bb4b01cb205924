"""`streamlit run app.py` on a free loopback port, for the browser test and the first-page benchmark.

Why one place: both need the same flags (headless, no file watcher, no usage stats) and the same health wait, and
the benchmark must time exactly the server the test drives.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

REPO = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """Streamlit exited or did not answer its health check in time (the log's tail is in the message)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def streamlit_server(env: Mapping[str, str], log: Path, timeout_s: float = 120.0) -> Iterator[str]:
    """Start the app, wait until /_stcore/health answers 200, yield its URL; stop it on exit."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=REPO, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"streamlit did not become healthy:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
