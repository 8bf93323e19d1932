"""The deployment's entry points run as real processes, without containers: the image's
entry point starts compose.yaml's node command line (token from a secret file, TLS from
``deploy/make-test-certs.sh``), and a coordinator reaches it over ``wss://``."""

from __future__ import annotations

import shutil
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from procs import ENTRYPOINT, ROOT, Node, compose_service, env, fedws_shim, set_option

import fedws as sy

HEALTHCHECK = ROOT / "deploy" / "healthcheck.sh"
CERTS = ROOT / "deploy" / "make-test-certs.sh"
TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    return fedws_shim(tmp_path / "bin")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed by deploy/make-test-certs.sh")
    out = tmp_path_factory.mktemp("certs")
    done = subprocess.run(["sh", str(CERTS), str(out), "alice"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return out


def test_make_test_certs_writes_a_ca_and_private_keys(certs: Path) -> None:
    assert sorted(p.name for p in certs.iterdir()) == ["alice.key", "alice.pem", "ca.key", "ca.pem"]
    for key in ("alice.key", "ca.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    assert "BEGIN CERTIFICATE" in (certs / "alice.pem").read_text()
    # the node's certificate verifies against the CA (the chain a client checks)
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    ctx.load_cert_chain(str(certs / "alice.pem"), str(certs / "alice.key"))


@pytest.fixture
def alice(tmp_path: Path, bin_dir: Path, certs: Path) -> Iterator[tuple[Node, Path]]:
    """compose.yaml's ``alice`` command line with this machine's paths: workers/alice.toml
    beside a small shard, the secret in a temp file, TLS from the test CA, port 0."""
    workers = tmp_path / "srv" / "workers"
    (workers / "data").mkdir(parents=True)
    shutil.copy(ROOT / "workers" / "alice.toml", workers / "alice.toml")
    from safetensors.torch import save_file

    save_file({"x": torch.rand(20, 64), "y": torch.randint(0, 10, (20,))}, str(workers / "data" / "alice.safetensors"))
    (workers / "data").chmod(0o555)  # the data mount is read-only
    secret = tmp_path / "fedws_token"
    secret.write_text(TOKEN + "\n")
    secret.chmod(0o400)

    pytest.importorskip("yaml")
    cmd = list(compose_service("alice")["command"])
    set_option(cmd, "--host", "127.0.0.1")  # tests never bind every interface
    set_option(cmd, "--port", "0")
    set_option(cmd, "--audit-log", str(tmp_path / "run" / "alice-audit.jsonl"))
    cmd += ["--certfile", str(certs / "alice.pem"), "--keyfile", str(certs / "alice.key")]
    node = Node(cmd, env(bin_dir, FEDWS_TOKEN_FILE=str(secret)), cwd=tmp_path / "srv")
    try:
        node.wait_ready()
        yield node, tmp_path
    finally:
        node.stop()
        (workers / "data").chmod(0o755)


def test_compose_node_command_serves_wss_with_the_secret_token(
    alice, certs: Path, hook: sy.TorchHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, tmp_path = alice
    assert node.url is not None and node.url.startswith("wss://127.0.0.1:")
    url = node.url.replace("127.0.0.1", "localhost")  # a name the certificate carries
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with sy.connect(url, hook=hook, token=TOKEN, ssl=ctx) as w:
        (x,) = w.search("#train", "#x")
        assert tuple(x.shape) == (20, 64)
        with pytest.raises(sy.PermissionDeniedError):  # private: served data never leaves
            x.get()
        with pytest.raises(sy.PermissionDeniedError):  # nor what is computed from it
            (x.sum() * 2).get()
    with pytest.raises(sy.AuthenticationError):
        sy.connect(url, hook=hook, token="wrong", ssl=ctx, connect_timeout=5)
    with pytest.raises(sy.FedwsConnectionError):  # an untrusted certificate is refused
        sy.connect(url, hook=hook, token=TOKEN, connect_timeout=5)
    # SSL_CERT_FILE trusts the test CA for a whole process (docs/deployment.md, "TLS")
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.pem"))
    with sy.connect(url, hook=hook, token=TOKEN, connect_timeout=5) as w:
        assert len(w.search("#train")) == 2
    # the audit log goes where compose's --audit-log says (a volume in the container)
    assert (tmp_path / "run" / "alice-audit.jsonl").exists()
    assert node.stop() == 0, "".join(node.lines)


@pytest.fixture
def fedws_status() -> None:
    from fedws.cli import build_parser

    if "status" not in build_parser()._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
        pytest.skip("`fedws status` is not in this tree yet")


def test_healthcheck_script_reports_the_node_up(fedws_status, alice, certs: Path, bin_dir: Path) -> None:
    node, tmp_path = alice
    assert node.url is not None
    check_env = env(bin_dir, FEDWS_TOKEN_FILE=str(tmp_path / "fedws_token"),
                    FEDWS_HEALTH_URL=node.url.replace("127.0.0.1", "localhost"), SSL_CERT_FILE=str(certs / "ca.pem"))
    up = subprocess.run(["sh", str(HEALTHCHECK)], env=check_env, capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stdout + up.stderr
    node.stop()
    down = subprocess.run(["sh", str(HEALTHCHECK)], env=check_env, capture_output=True, text=True, timeout=60)
    assert down.returncode != 0


def test_entrypoint_exports_the_token_file_and_runs_programs(tmp_path: Path, bin_dir: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("abc\n")
    out = subprocess.run(["sh", str(ENTRYPOINT), "sh", "-c", 'printf %s "$FEDWS_TOKEN"'],
                         env=env(bin_dir, FEDWS_TOKEN_FILE=str(secret)), capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout == "abc"
    # a fedws subcommand goes to fedws
    out = subprocess.run(["sh", str(ENTRYPOINT), "--version"], env=env(bin_dir), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("fedws ")


@pytest.mark.parametrize("content", [None, ""], ids=["missing", "empty"])
def test_entrypoint_refuses_a_missing_or_empty_token_file(tmp_path: Path, bin_dir: Path, content: str | None) -> None:
    secret = tmp_path / "token"
    if content is not None:
        secret.write_text(content)
    out = subprocess.run(["sh", str(ENTRYPOINT), "worker", "--id", "x"],
                         env=env(bin_dir, FEDWS_TOKEN_FILE=str(secret)), capture_output=True, text=True, timeout=10)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and str(secret) in out.stderr  # one line that says what to do
