"""A real `python -m kiln.serve` process on localhost for the serve tests, plus tests of its CLI.

``ServerProcess(model, *args)`` starts the server on a free port (``--port 0``; the port is read from
its "serving ... on http://HOST:PORT" log line), waits for /health, and stops it with SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "tiny"
API_KEY = "sk-test-kiln"


class ServerProcess:
    def __init__(self, model: str | None, *args: str, log_dir: Path, api_key: str | None = API_KEY) -> None:
        self.model = model
        self.args = list(args)
        self.api_key = api_key
        self.log_path = log_dir / f"server-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 120.0) -> ServerProcess:
        model = [self.model] if self.model is not None else []  # None: the embedded demo model
        cmd = [sys.executable, "-m", "kiln.serve", *model, "--port", "0", "--served-model-name", MODEL_NAME]
        cmd += ["--log-interval", "0", *self.args]
        env = {k: v for k, v in os.environ.items() if k != "KILN_API_KEY"}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        # One intra-op thread: tiny models gain nothing from more, and on a small shared CI machine
        # OpenMP threads of the server and of its engine worker would fight over the cores.
        env.setdefault("OMP_NUM_THREADS", "1")
        if self.api_key is not None:
            env["KILN_API_KEY"] = self.api_key  # the environment route of --api-key
        log = open(self.log_path, "wb")  # noqa: SIM115 - the process writes it until it exits
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"serving \S+ on (http://[\d.]+:\d+)", self.log())
            if m:
                self.base_url = m.group(1)
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        else:
            self.kill()
            raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()[-3000:]}")
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"/health never answered 200:\n{self.log()[-3000:]}")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.children():
                _kill_pid(pid)
            self.proc.kill()
            self.proc.wait(10)

    # ------------------------------------------------------------------ helpers
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def children(self) -> list[int]:
        """Child processes of the server (e.g. the engine worker)."""
        out: list[int] = []
        for task in Path(f"/proc/{self.pid}/task").glob("*"):
            try:
                out += [int(x) for x in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
        return out

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all label sets) from /metrics."""
        text = httpx.get(self.url("/metrics"), headers=self.headers, timeout=10).text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"metric {name} not in /metrics"
        return total


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------- CLI tests


def test_cli_arguments_and_config(tmp_path, monkeypatch):
    from kiln.serve.cli_args import build_parser
    from kiln.serve.config import ServeConfig

    args = build_parser().parse_args([])
    assert args.model is None and args.host == "127.0.0.1" and args.port == 8000
    monkeypatch.setenv("KILN_API_KEY", "from-env")
    assert ServeConfig.from_args(args).api_key == "from-env"
    args = build_parser().parse_args(["m", "--api-key", "flag", "--max-n", "3"])
    cfg = ServeConfig.from_args(args)
    assert cfg.api_key == "flag" and cfg.max_n == 3
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    assert ServeConfig.from_args(
        build_parser().parse_args(["--chat-template", str(template)])
    ).chat_template == ("{{ messages[0]['content'] }}")
    with pytest.raises(ValueError, match="--chat-template: cannot read"):
        ServeConfig.from_args(build_parser().parse_args(["--chat-template", str(tmp_path / "missing")]))
    with pytest.raises(ValueError, match="--max-n must be >= 1"):
        ServeConfig.from_args(build_parser().parse_args(["--max-n", "0"]))


def test_importing_kiln_does_not_import_server_dependencies():
    code = (
        "import sys, kiln, kiln.serve, kiln.serve.cli_args, kiln.sampling_params\n"
        "heavy = ('fastapi', 'uvicorn', 'pydantic', 'prometheus_client', 'starlette')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )


def test_python_m_kiln_serve_help_and_bad_model(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-m", "kiln.serve", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--max-queued-requests" in out.stdout and "--shutdown-timeout" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "kiln.serve", str(tmp_path / "nope"), "--port", "0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "kiln serve: error:" in bad.stderr and "Traceback" not in bad.stderr


def test_taken_port_fails_before_loading_the_model(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "kiln.serve", str(tmp_path / "not-loaded"), "--port", str(port)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 2
    assert f"cannot bind 127.0.0.1:{port}" in out.stderr and "not-loaded" not in out.stderr


def test_serve_without_model_serves_the_demo_model(tmp_path):
    from kiln.demo import demo_model_path

    try:
        demo_model_path()
    except FileNotFoundError:
        pytest.skip("the demo model is not built in this checkout")
    with ServerProcess(None, log_dir=tmp_path) as s:  # no MODEL argument
        r = httpx.post(
            s.url("/v1/chat/completions"),
            headers=s.headers,
            json={"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 8},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == MODEL_NAME and r.json()["usage"]["completion_tokens"] >= 1
