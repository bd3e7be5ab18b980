"""Peer processes on this machine: the local demo, the tests and the benchmarks start swarms here."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

READY = re.compile(r"^(seed|peer) (\S+) listening on (.+)$")


class PeerProcessError(RuntimeError):
    """A peer process exited or stayed silent before it was ready."""


def peer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarm.cli", *args]


@dataclass
class PeerProcess:
    """One ``legion-peer`` process running ``count`` peers; ``addrs`` holds each peer's loopback address."""

    proc: subprocess.Popen
    log_path: Path
    peer_ids: list[str] = field(default_factory=list)
    addrs: list[str] = field(default_factory=list)
    ready_lines: list[str] = field(default_factory=list)
    pending_lines: list[str] = field(default_factory=list)
    pending: bytes = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def output_lines(self, timeout: float) -> list[str]:
        """Wait for the process to exit; every stdout line after the ready lines."""
        rest, _ = self.proc.communicate(timeout=timeout)
        text = (self.pending + rest).decode(errors="replace")
        return self.pending_lines + [line for line in text.splitlines() if line]

    def kill(self) -> None:
        """``kill -9``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if the process is not gone within ``timeout``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.proc.stdout.closed:
            self.proc.stdout.close()
        return self.proc.returncode


def start_peer_process(args: list[str], count: int = 1, *, log_dir: Path | None = None,
                       timeout: float = 60.0, env: dict[str, str] | None = None) -> PeerProcess:
    """Start ``legion-peer ARGS --count COUNT`` and wait until every peer in it printed its address."""
    process = start_process(peer_command(*args, "--count", str(count)), READY, count,
                            log_dir=log_dir, timeout=timeout, env=env)
    for line in process.ready_lines:
        match = READY.match(line)
        process.peer_ids.append(match.group(2))
        addrs = match.group(3).split()
        process.addrs.append(next((a for a in addrs if "/ip4/127." in a), addrs[0]))
    return process


def start_process(command: list[str], ready: re.Pattern, count: int = 1, *, log_dir: Path | None = None,
                  timeout: float = 60.0, env: dict[str, str] | None = None) -> PeerProcess:
    """Start ``command`` (stderr to a log file) and wait for ``count`` stdout lines matching ``ready``."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="legion-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.mkstemp(prefix="peer-", suffix=".log", dir=log_dir)[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
    process = PeerProcess(proc, log_path)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while len(process.ready_lines) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                process.kill()
                raise PeerProcessError(f"process not ready within {timeout:g}s:\n{process.log_tail()}")
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                proc.wait()
                raise PeerProcessError(f"process exited with {proc.returncode}:\n{process.log_tail()}")
            process.pending += chunk
            *lines, process.pending = process.pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                if ready.match(text) and len(process.ready_lines) < count:
                    process.ready_lines.append(text)
                else:
                    process.pending_lines.append(text)
    return process


def status_json(bootstrap: str, *extra: str, timeout: float = 60.0) -> list[dict]:
    """Run ``legion-peer status --json`` as its own process and return the peer objects."""
    done = subprocess.run(peer_command("status", "--bootstrap", bootstrap, "--json", "--quiet", *extra),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise PeerProcessError(f"status exited with {done.returncode}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def start_training_swarm(peers: int, run_args: list[str], out: Path, *, heartbeat: float = 2.0,
                         extra: list[str] | None = None, seed_extra: list[str] | None = None,
                         identities: Path | None = None, timeout: float = 60.0) -> list[PeerProcess]:
    """A seed publishing the run ``run_args`` and ``peers - 1`` peers joining it, one process each,
    single-threaded torch, all starting together; peer i writes to ``out/peer{i}`` and, with
    ``identities``, keeps its key in ``identities/id{i}.key`` (the same peer ids run after run).
    ``seed_extra`` are options of the seed alone (``--dashboard``, say)."""
    common = ["--listen", "/ip4/127.0.0.1/tcp/0", "--heartbeat", str(heartbeat), "--threads", "1",
              "--wait-peers", str(peers), *(extra or [])]

    def own(i: int) -> list[str]:
        identity = ["--identity", str(identities / f"id{i}.key")] if identities else []
        return [*identity, "--out", str(out / f"peer{i}"), *common]

    processes = [start_peer_process(["--seed", *run_args, *own(0), *(seed_extra or [])], log_dir=out / "logs",
                                    timeout=timeout)]
    try:
        for i in range(1, peers):
            processes.append(start_peer_process(["--bootstrap", processes[0].addrs[0], *own(i)],
                                                log_dir=out / "logs", timeout=timeout))
    except PeerProcessError:
        for process in processes:
            process.kill()
        raise
    return processes


def training_summary(process: PeerProcess, timeout: float) -> dict:
    """Wait for a training peer to finish; its ``done`` summary."""
    lines = process.output_lines(timeout)
    done = [json.loads(line[5:]) for line in lines if line.startswith("done ")]
    if process.proc.returncode != 0 or not done:
        raise PeerProcessError(f"training peer exited with {process.proc.returncode}:\n{process.log_tail()}")
    return done[0]
