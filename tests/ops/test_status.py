"""``worker.ping()``, ``worker.info()`` and ``fedws status``: what a node tells of itself,
and what a private node tells a principal that may not see the whole node."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

import fedws as sy
from fedws.client.status import NodeStatus
from fedws.launch import NodeProcess, start_node
from fedws.protocol import codec
from fedws.protocol.messages import Info, Kind
from fedws.status import _HEAD, _KIND_INFO, _NODE_ID_HEADER, _request_blob, query, urls_from_configs
from fedws.transport.handshake import NODE_ID_HEADER


def _fedws(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedws", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def test_the_torch_free_client_speaks_the_real_protocol() -> None:
    """fedws/status.py writes its one request by hand; these are the codec's bytes."""
    assert _request_blob() == codec.encode_bytes(Info("status").to_wire(seq=1))
    assert _KIND_INFO == Kind.INFO and _NODE_ID_HEADER == NODE_ID_HEADER
    assert _HEAD.format == codec._HEAD.format


def test_ping_returns_the_round_trip_and_info_a_typed_status(make_worker: Callable[..., sy.Worker]) -> None:
    bob = make_worker("bob")
    rtt = bob.ping()
    assert isinstance(rtt, float) and 0 < rtt < 10
    x = torch.ones(256).send(bob)
    status = bob.info()
    assert isinstance(status, NodeStatus)
    assert status.id == "bob" and status.version == sy.__version__ and status.scope == "node"
    assert status.objects >= 1 and status.bytes >= 1024 and status.plans == 0
    assert status.memory_budget is not None and status.memory_used == status.bytes
    assert status.uptime_s >= 0
    del x


def test_fedws_status_shows_running_nodes_as_a_table_and_json(tmp_path: Path) -> None:
    nodes = [start_node(id=n, port=0, extra_args=["--insecure-dev", "--threads", "1"]) for n in ("s1", "s2")]
    try:
        table = _fedws("status", *(n.url for n in nodes))
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split()[:4] == ["NODE", "URL", "STATE", "LATENCY"]
        assert [r.split()[0] for r in rows] == ["s1", "s2"] and all(" up " in r for r in rows)
        out = _fedws("status", "--json", nodes[0].url, "ws://127.0.0.1:9")
        assert out.returncode == 1  # one node is down: a healthcheck fails
        up, down = json.loads(out.stdout)
        assert up["up"] and up["id"] == "s1" and up["latency_s"] > 0 and up["principals"] == 1
        assert not down["up"] and "refused" in down["error"]
    finally:
        for n in nodes:
            n.stop()


def test_status_reads_urls_from_a_config_directory(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('id = "a"\nport = 9001\n')
    (tmp_path / "b.toml").write_text('id = "b"\nhost = "0.0.0.0"\nport = 9002\ncertfile = "c.pem"\n')
    (tmp_path / "notes.toml").write_text('title = "not a node"\n')
    urls, token = urls_from_configs(tmp_path)
    assert urls == ["ws://127.0.0.1:9001", "wss://127.0.0.1:9002"] and token is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.toml").write_text("id = \n")
    result = _fedws("status", "--config", str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "not a readable TOML file" in result.stderr


def _private_node(tmp_path: Path) -> tuple[NodeProcess, dict[str, str]]:
    tokens = {"operator": "op-token-1", "lab": "lab-token-2"}
    cfg = tmp_path / "priv.toml"
    cfg.write_text(
        'id = "priv"\nport = 0\nthreads = 1\n'
        f'[[tokens]]\nprincipal = "operator"\nsha256 = "{hashlib.sha256(tokens["operator"].encode()).hexdigest()}"\n'
        f'[[tokens]]\nprincipal = "lab"\nmay = ["compute"]\n'
        f'sha256 = "{hashlib.sha256(tokens["lab"].encode()).hexdigest()}"\n'
    )
    return start_node(cfg), tokens


def test_a_private_node_shows_a_restricted_principal_only_its_own_session(tmp_path: Path) -> None:
    node, tokens = _private_node(tmp_path)
    try:
        hook = sy.TorchHook(torch, federation=sy.Federation())
        with sy.connect(node.url, tokens["operator"], hook=hook) as op:
            kept = [torch.ones(1000).send(op) for _ in range(3)]
            op.ping()
            lab_hook = sy.TorchHook(torch, federation=sy.Federation())
            with sy.connect(node.url, tokens["lab"], hook=lab_hook) as lab:
                mine = torch.ones(10).send(lab)
                seen = lab.info()
                # The lab sees its own object, nothing of the operator's, no node-wide numbers.
                assert seen.scope == "session" and seen.objects == 1 and seen.bytes == 40
                assert seen.principals is None and seen.connections is None and seen.memory_used is None
                whole = op.info()
                assert whole.scope == "node" and whole.objects == 4 and whole.principals == 2
                del mine
            del kept
        # Without a token: refused at the handshake, nothing shown.
        report = query(node.url, None, timeout=5)
        assert not report.up and report.status is None and "token" in (report.error or "")
        wrong = _fedws("status", node.url, env={"FEDWS_TOKEN": "guess", "PATH": "/usr/bin:/bin"})
        assert wrong.returncode == 1 and "priv" not in wrong.stdout
    finally:
        node.stop()


def test_status_with_a_token_file(tmp_path: Path) -> None:
    node, tokens = _private_node(tmp_path)
    try:
        token_file = tmp_path / "tok"
        token_file.write_text(tokens["operator"] + "\n")
        out = _fedws("status", "--json", "--token-file", str(token_file), node.url)
        assert out.returncode == 0, out.stderr
        (item,) = json.loads(out.stdout)
        assert item["id"] == "priv" and item["scope"] == "node" and item["policy"] == "private"
        missing = _fedws("status", "--token-file", str(tmp_path / "nope"), node.url)
        assert missing.returncode == 2 and "cannot read token file" in missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1
    finally:
        node.stop()
