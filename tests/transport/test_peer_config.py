"""The ``[[peers]]`` table of a node config: what a node may link to, read strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedws.node_config import load_config, same_url


def _write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text('id = "alice"\n' + body)
    return p


def test_peers_are_read_with_their_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "carol.token").write_text("t-carol\n")
    monkeypatch.setenv("TOKEN_FOR_BOB", "t-bob")
    cfg = load_config(_write(tmp_path, (
        "peer_timeout = 3\n"
        '[[peers]]\nid = "bob"\nurl = "ws://127.0.0.1:8778"\ntoken_env = "TOKEN_FOR_BOB"\n'
        '[[peers]]\nid = "carol"\nurl = "wss://carol.example:443"\ntoken_file = "carol.token"\n'
    )))
    assert cfg.peer_timeout == 3 and not cfg.open_peers
    bob, carol = cfg.peers
    assert bob.credential() == "t-bob" and carol.credential() == "t-carol"
    assert bob.secret() is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[[peers]]\nid = "bob"\n', "needs 'id' and 'url'"),
        ('[[peers]]\nid = "bob"\nurl = "http://x:1"\n', "ws://host:port"),
        ('[[peers]]\nid = "bob"\nurl = "ws://x:1"\npassword = "x"\n', "unknown keys"),
        ('[[peers]]\nid = "bob"\nurl = "ws://x:1"\ntoken_env = "FEDWS_NO_SUCH_VAR_9"\n', "is not set"),
        ('[[peers]]\nid = "bob"\nurl = "ws://x:1"\ntoken_file = "missing.token"\n', "cannot read"),
        ('[[peers]]\nid = "bob"\nurl = "ws://x:1"\ntoken = "a"\ntoken_env = "B"\n', "one of"),
        ('[[peers]]\nid = "bob"\nurl = "ws://x:1"\n[[peers]]\nid = "bob"\nurl = "ws://y:1"\n', "twice"),
    ],
)
def test_a_bad_peer_entry_stops_the_node_at_start(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, body))


def test_same_url_ignores_case_default_ports_and_a_trailing_slash() -> None:
    assert same_url("ws://Bob.example/", "ws://bob.example:80")
    assert same_url("wss://bob.example", "wss://bob.example:443")
    assert not same_url("ws://bob.example:8778", "ws://bob.example:8779")
    assert not same_url("ws://bob.example:8778", "wss://bob.example:8778")
    assert not same_url("ws://127.0.0.1:8778", "ws://127.0.0.2:8778")
