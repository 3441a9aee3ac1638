"""`make lab` (kclub lab) serves the labs on localhost, and only with Jupyter's token."""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

from shared.cli import lab_server_argv
from shared.parallel.launch import free_port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_lab_server_requires_token_and_sees_labs(tmp_path):
    port, token = free_port(), "kc-test-token"
    env = {**os.environ, "JUPYTER_TOKEN": token, "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    server = subprocess.Popen(lab_server_argv(port), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, _ = _get(f"{base}/api/status?token={token}")
                if status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, "jupyter lab exited"
            assert time.monotonic() < deadline, "jupyter lab did not start in 60 s"
            time.sleep(0.5)
        assert _get(f"{base}/api/contents/online-softmax.ipynb")[0] == 403  # no token
        status, body = _get(f"{base}/api/contents/online-softmax.ipynb?token={token}&content=0")
        assert status == 200 and json.loads(body)["type"] == "notebook"
        status, body = _get(f"{base}/api/kernelspecs?token={token}")
        assert status == 200 and "python3" in json.loads(body)["kernelspecs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
