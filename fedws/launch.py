"""Starting and stopping worker nodes as processes, from Python, tests and the CLI.

A node is started with ``python -m fedws worker`` and is ready once it prints its URL line;
waiting for that line (not sleeping) is how callers know it listens. Nodes are stopped by
the PID recorded at start, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["NodeProcess", "start_node", "start_nodes", "up", "down"]


@dataclass
class NodeProcess:
    """A node running in a child process."""

    id: str
    url: str
    pid: int
    process: subprocess.Popen[str] | None = field(default=None, repr=False)
    already_running: bool = False  # ``up`` found it running (its PID file and process)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``."""
        proc = self.process
        if proc is None:
            _terminate_pid(self.pid, timeout)
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if proc.stdout is not None:
            proc.stdout.close()


def _command(config: str | Path | None, worker_id: str | None, port: int | None, extra: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "fedws", "worker"]
    if config is not None:
        cmd += ["--config", str(config)]
    if worker_id is not None:
        cmd += ["--id", worker_id]
    if port is not None:
        cmd += ["--port", str(port)]
    return cmd + list(extra)


def start_node(
    config: str | Path | None = None,
    *,
    id: str | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
    log_file: Path | None = None,
    connect: str | None = None,
) -> NodeProcess:
    """Start one node and return once it listens (port 0 picks a free port).

    With ``connect`` (a coordinator's URL, ``sy.serve(...)`` there) the node dials out
    instead (``--connect``); it returns once the coordinator accepted it, and ``url`` is the
    coordinator's. Pass the token in ``extra_args`` (``--token-file F``).

    Raises:
        RuntimeError: the node exited or printed no URL within ``timeout``; its output is
            in the message.
    """
    cmd = _command(config, id, port, [*extra_args, *(["--connect", connect] if connect else [])])
    stderr = open(log_file, "a") if log_file else subprocess.STDOUT  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1, start_new_session=True
    )
    lines: list[str] = []
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if " listening on " in line or (line.startswith("fedws worker ") and " connected to " in line):
                found.append(line.strip())
                done.set()
                break
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    done.wait(timeout)
    if not found:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"node did not start ({' '.join(cmd)}):\n{''.join(lines)[-2000:]}")
    words = found[0].split()
    node = NodeProcess(id=words[2], url=words[-1], pid=proc.pid, process=proc)
    # Keep draining its output so a chatty node never blocks on a full pipe.
    threading.Thread(target=_drain, args=(proc,), daemon=True).start()
    return node


def _drain(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        for _ in proc.stdout:
            pass
    except (ValueError, OSError):
        pass


@contextlib.contextmanager
def start_nodes(configs: Sequence[str | Path], **kwargs: object) -> Iterator[list[NodeProcess]]:
    """Start one node per config, yield them, stop them all on exit (even on error)."""
    nodes: list[NodeProcess] = []
    try:
        for cfg in configs:
            nodes.append(start_node(cfg, **kwargs))  # type: ignore[arg-type]
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _terminate_pid(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _config_id(config: Path) -> str | None:
    """The ``id`` of a node config, read without loading the node (None: not readable)."""
    import tomllib

    try:
        value = tomllib.loads(Path(config).read_text()).get("id")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return value if isinstance(value, str) else None


def _is_fedws_node(pid: int) -> bool:
    """Whether ``pid`` is alive and (where /proc tells) a fedws process, not a reused PID."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's: not ours to stop
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return b"fedws" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def _read_pid_file(pid_file: Path) -> tuple[int, str] | None:
    try:
        words = pid_file.read_text().split()
        return int(words[0]), (words[1] if len(words) > 1 else "?")
    except (OSError, ValueError, IndexError):
        return None


def up(configs: Sequence[Path], run_dir: Path) -> list[NodeProcess]:
    """Start nodes detached from this process; record ``<id>.pid`` files in ``run_dir``.

    Idempotent: a node whose PID file names a live fedws process is left alone and returned
    with ``already_running``; a stale PID file is replaced.

    Raises:
        RuntimeError: a node did not start; one line with its last words (e.g. the port
            is taken) and where its log is. Nodes started before it keep running.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    nodes = []
    for cfg in configs:
        node_id = _config_id(cfg)
        pid_file = run_dir / f"{node_id}.pid"
        recorded = _read_pid_file(pid_file) if node_id is not None else None
        if recorded is not None and _is_fedws_node(recorded[0]):
            nodes.append(NodeProcess(node_id or "?", recorded[1], recorded[0], already_running=True))
            continue
        log = run_dir / f"{Path(cfg).stem}.log"
        try:
            node = start_node(cfg, log_file=log)
        except RuntimeError:
            raise RuntimeError(f"{cfg}: {_last_line(log)} (log: {log})") from None
        (run_dir / f"{node.id}.pid").write_text(f"{node.pid}\n{node.url}\n")
        node.process = None  # let it outlive us; `down` stops it by PID
        nodes.append(node)
    return nodes


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines[-1].strip() if lines else "the node exited before it listened"


def down(run_dir: Path) -> int:
    """Stop every node whose PID file is in ``run_dir``; returns how many were stopped.

    Always cleans up: every PID file goes, whether its node was running, already gone, or
    the file is unreadable; a PID that is no longer a fedws process is not signalled.
    """
    count = 0
    for pid_file in sorted(run_dir.glob("*.pid")):
        recorded = _read_pid_file(pid_file)
        if recorded is not None and _is_fedws_node(recorded[0]):
            _terminate_pid(recorded[0], 10.0)
            count += 1
        pid_file.unlink(missing_ok=True)
    return count
