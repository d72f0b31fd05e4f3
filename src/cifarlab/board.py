"""cifarlab-tensorboard: serve a log folder with TensorBoard on 127.0.0.1, and look at it in headless Chromium.

    cifarlab-tensorboard                       # every run and sweep under outputs/, on a free port it prints first
    cifarlab-tensorboard outputs/runs/<date>   # one day's runs
    cifarlab-tensorboard --port 6006
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"  # never the network: a log folder is nobody else's business


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def command(logdir: str | Path, port: int) -> list[str]:
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", HOST, "--port", str(port)]


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"TensorBoard did not come up at {url}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def serve(logdir: str | Path) -> Iterator[str]:
    """TensorBoard on `logdir` in the background; yields its base URL, stops it on exit."""
    port = free_port()
    proc = subprocess.Popen(command(logdir, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        wait_until_up(url, proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(url: str, path: Path, size: tuple[int, int] = (1400, 1000), budget_ms: int = 20_000) -> Path:
    """Render `url` in headless Chromium, letting its scripts run for `budget_ms` of virtual time, into a PNG."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("chromium not found; install Debian's chromium package (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             # this machine has no outside network: keep Chromium from trying
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
             f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}",
             "--hide-scrollbars", f"--screenshot={path}", url],
            check=True, capture_output=True, timeout=120,
        )
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logdir", nargs="?", default="outputs", help="a run folder, a sweep folder, or outputs/")
    p.add_argument("--port", type=int, default=0, help="0 = a free port")
    args = p.parse_args()
    if not Path(args.logdir).is_dir():
        raise SystemExit(f"error: log folder {args.logdir} does not exist")
    port = args.port or free_port()
    print(f"TensorBoard for {args.logdir} at http://{HOST}:{port}/  (Ctrl-C stops it)", flush=True)
    cmd = command(args.logdir, port)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
