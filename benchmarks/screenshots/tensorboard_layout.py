"""Screenshot of the monitors' TensorBoard layout, taken from a real TensorBoard by a headless Chromium.

Starts ``tensorboard --logdir LOGDIR`` on a free local port, waits until it serves, loads the Custom Scalars tab (or
another ``--tab``) in ``chromium --headless`` with a virtual-time budget long enough for the charts to render, writes
the PNG, and stops TensorBoard. Needs a Chromium or Chrome binary (``--browser``; e.g. Debian's ``chromium`` package).

Usage::

    python examples/monitor_ppo.py --timesteps 40960 --task-length 10240 --logdir /tmp/tb_shot
    python benchmarks/screenshots/tensorboard_layout.py --logdir /tmp/tb_shot --out docs/img/tensorboard_layout.png
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"TensorBoard did not answer at {url} within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tab", default="custom_scalars", help="the TensorBoard tab (URL fragment)")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=2200)
    parser.add_argument("--render-ms", type=int, default=30_000, help="virtual time the page gets to render")
    parser.add_argument("--browser", default=shutil.which("chromium") or shutil.which("google-chrome") or "chromium")
    args = parser.parse_args()
    if shutil.which(args.browser) is None:
        raise SystemExit(f"no browser at --browser {args.browser!r}: install Chromium (Debian: apt-get install chromium)")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_serving(base, timeout=120)
        time.sleep(5)  # the first scan of the log folder
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = [args.browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        command += [f"--window-size={args.width},{args.height}", f"--virtual-time-budget={args.render_ms}"]
        command += [f"--screenshot={args.out.resolve()}", f"{base}/?darkMode=false#{args.tab}"]
        subprocess.run(command, check=True, capture_output=True, timeout=300)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
