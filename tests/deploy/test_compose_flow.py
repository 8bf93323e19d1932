"""compose.yaml's whole run without containers: ``prepare``, then ``alice``, ``bob`` and
``charlie``, then ``demo``, each service's own command line started through the image's
entry point, in a directory laid out as the image's ``/srv/fedws`` (examples/, workers/),
with the data directory read-only for the nodes as the ``shards`` volume is."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from procs import ENTRYPOINT, ROOT, Node, compose_service, env, fedws_shim, set_option

NODES = ("alice", "bob", "charlie")
TOKEN = "compose-flow-token"


def _image_layout(srv: Path) -> None:
    """What the Dockerfile copies: the node configs and (demo target) the example scripts."""
    (srv / "workers" / "data").mkdir(parents=True)
    (srv / "examples").mkdir()
    for config in (ROOT / "workers").glob("*.toml"):
        shutil.copy(config, srv / "workers")
    for script in (ROOT / "examples").glob("*.py"):
        shutil.copy(script, srv / "examples")


def _python(cmd: list[str]) -> list[str]:
    return [sys.executable if c == "python" else c for c in cmd]


def test_prepare_nodes_and_demo_run_as_compose_runs_them(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    pytest.importorskip("sklearn", reason="the demo extra prepares the digits shards")
    demo = compose_service("demo")
    if "--nodes" not in (ROOT / "examples" / "federated_demo.py").read_text():
        pytest.skip("examples/federated_demo.py has no --nodes yet")
    srv = tmp_path / "srv"
    _image_layout(srv)
    bin_dir = fedws_shim(tmp_path / "bin")
    secret = tmp_path / "secrets" / "fedws_token"
    secret.parent.mkdir()
    secret.write_text(TOKEN + "\n")

    # prepare: the one-shot service writes the shards (into the volume)
    prep = subprocess.run(["sh", str(ENTRYPOINT), *_python(compose_service("prepare")["command"])],
                          cwd=srv, env=env(bin_dir), capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    data = srv / "workers" / "data"
    assert {f"{n}.safetensors" for n in NODES} | {"test.safetensors"} <= {p.name for p in data.iterdir()}
    data.chmod(0o555)  # the nodes and the demo mount it read-only

    nodes: dict[str, Node] = {}
    try:
        for name in NODES:
            service = compose_service(name)
            cmd = list(service["command"])
            set_option(cmd, "--host", "127.0.0.1")
            set_option(cmd, "--port", "0")
            set_option(cmd, "--audit-log", str(tmp_path / "run" / f"{name}-audit.jsonl"))
            token_file = service["environment"]["FEDWS_TOKEN_FILE"]
            assert token_file == f"/run/secrets/{service['secrets'][0]}"
            nodes[name] = Node(cmd, env(bin_dir, FEDWS_TOKEN_FILE=str(secret)), cwd=srv)
        urls = {name: node.wait_ready() for name, node in nodes.items()}

        # demo: the service's command, with the nodes' real addresses and the secret's path
        cmd = _python(list(demo["command"]))
        compose_urls = cmd[cmd.index("--nodes") + 1].split(",")
        set_option(cmd, "--nodes", ",".join(urls[u.split("//")[1].split(":")[0]] for u in compose_urls))
        set_option(cmd, "--token-file", str(secret))
        cmd += ["--rounds", "1", "--local-epochs", "1"]  # one short round: seconds, not a minute
        if "--no-plot" in (ROOT / "examples" / "federated_demo.py").read_text():
            cmd.append("--no-plot")
        run = subprocess.run(["sh", str(ENTRYPOINT), *cmd], cwd=srv, env=env(bin_dir, MPLCONFIGDIR=str(tmp_path)),
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "round  1/1" in run.stdout and "test acc" in run.stdout
    finally:
        codes = {name: node.stop() for name, node in nodes.items()}
        data.chmod(0o755)
    assert codes == {name: 0 for name in NODES}, {n: "".join(node.lines)[-800:] for n, node in nodes.items()}
    # each node trained on its private shard with the one approved plan, and released only
    # what that plan made; the audit log says so
    node_cmd = compose_service(NODES[0])["command"]
    approved = node_cmd[node_cmd.index("--approve-plan") + 1]
    for name in NODES:
        records = [json.loads(line) for line in (tmp_path / "run" / f"{name}-audit.jsonl").read_text().splitlines()]
        runs = [r for r in records if r["event"] == "run_plan"]
        assert runs and all(r["plan"] == approved and r["approved"] and r["private_inputs"] for r in runs), name
        assert not any(r["outputs_private"] for r in runs)
        assert any(r["event"] == "release" for r in records)
        assert not any(r["event"] == "refuse" for r in records), name
