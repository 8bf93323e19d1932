"""The ``fedws`` command: ``fedws worker ...`` starts a node; ``fedws up/down`` a federation.

``python -m fedws`` is the same program.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from .version import __version__

__all__ = ["main"]

INSECURE_WARNING = (
    "WARNING: --insecure-dev (or policy = \"open\") turns every protection off: any coordinator "
    "may read, change and delete everything on the node, including the data it serves."
)


def _worker_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "worker",
        help="start a worker node",
        description="Start a worker node that serves tensors over a WebSocket. "
        "It prints one line with its URL once it listens; SIGINT/SIGTERM stop it cleanly. "
        "By default the node is private: each coordinator sees only its own objects, the data "
        "the node serves is read-only and never leaves, and values computed from it leave only "
        "through the release rules of its config (approved plans, differential privacy). "
        f"{INSECURE_WARNING}",
    )
    p.add_argument("--config", type=Path, help="node config (TOML); options below override it")
    p.add_argument("--id", help="the node's id (required without --config)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port to listen on (default 8777; 0 picks a free one)")
    p.add_argument("--token", help="shared token clients must present (default: $FEDWS_TOKEN)")
    p.add_argument("--certfile", help="TLS certificate: serve wss:// instead of ws://")
    p.add_argument("--keyfile", help="TLS private key for --certfile")
    p.add_argument("--max-frame-mb", type=float, help="largest frame accepted, MiB (default 1024)")
    p.add_argument("--max-store-mb", type=float, help="cap on the bytes the node holds, MiB")
    p.add_argument(
        "--max-memory-mb",
        type=float,
        help="memory budget, MiB: bytes held plus one command's output, checked before it runs "
        "(default: half of physical memory, or --max-store-mb if smaller)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads for this node (default: torch's choice; use 1 when several "
        "nodes share a small machine)",
    )
    p.add_argument(
        "--insecure-dev",
        action="store_true",
        help="DEVELOPMENT ONLY: run the node open (policy = \"open\"): every coordinator may read, "
        "change and delete every object, served data included, and make the node connect to any "
        "address (add_worker), not only to the [[peers]] its config lists. Never with real data.",
    )
    p.add_argument(
        "--approve-plan",
        action="append",
        default=[],
        metavar="DIGEST",
        help="approve a plan by its sha256 digest (repeatable; adds to [release] approved_plans): "
        "what it computes from private data, and what it updates in place, may leave the node",
    )
    p.add_argument("--audit-log", help="write the audit log (JSON lines, rotated) to this file")
    p.add_argument(
        "--session-grace",
        type=float,
        metavar="SECONDS",
        help="free a session's objects this long after its last connection closed, unless it "
        "reconnects first or made them durable (ptr.persist()); default 300",
    )
    p.add_argument(
        "--connect", metavar="URL",
        help="dial out instead of listening: connect to the coordinator at URL (ws:// or wss://; "
        "sy.serve(...) there) and redial with backoff when the link drops (nodes behind firewalls)",
    )
    p.add_argument("--token-file", type=Path, help="file holding the token (first line; instead of --token)")
    p.add_argument("--cafile", help="with --connect wss://: the certificate (or CA) the coordinator must present")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging: debug lines of every fedws logger")
    p.add_argument(
        "--log-level", action="append", default=[], metavar="[LOGGER=]LEVEL",
        help="log level (default INFO: one line per connection, plan run, release, refusal), or one "
        "logger's: --log-level fedws.node=DEBUG (repeatable)",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON")
    p.add_argument(
        "--nodes", type=int, metavar="N",
        help="host N logical nodes in this process (ids ID_PREFIX0..), each with its own store, "
        "policy and audit, reached at ws://host:port/ID; a config with [[node]] tables does the same",
    )
    p.add_argument("--id-prefix", default="node-", help="ids of --nodes: PREFIX0, PREFIX1, ... (default node-)")


def _up_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="start the nodes of several configs in the background")
    p.add_argument("configs", nargs="+", type=Path, help="node configs (TOML)")
    p.add_argument("--run-dir", type=Path, default=Path("workers/run"), help="where PID and log files go")
    d = sub.add_parser("down", help="stop the nodes 'fedws up' started (by their recorded PIDs)")
    d.add_argument("--run-dir", type=Path, default=Path("workers/run"), help="where 'up' wrote PID files")


def _plan_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("plan", help="review and approve the plans that reached a private node")
    ps = p.add_subparsers(dest="plan_command", required=True)
    show = ps.add_parser("show", help="list the plans in a node's audit log, or print one's code")
    show.add_argument("audit_log", type=Path, help="the node's audit log (audit_log in its config)")
    show.add_argument("digest", nargs="?", help="a digest (or its first digits): print that plan's code")
    appr = ps.add_parser("approve", help="add a plan digest to [release] approved_plans of a node config")
    appr.add_argument("digest", help="the plan's sha256 digest (64 hex digits)")
    appr.add_argument("--config", type=Path, required=True, help="the node config (TOML) to change")


def run_plan_command(args: argparse.Namespace) -> int:
    from .plan_admin import approve, show

    try:
        if args.plan_command == "show":
            print(show(args.audit_log, args.digest))
        else:
            added = approve(args.config, args.digest)
            print(f"{'approved' if added else 'already approved'}: {args.digest} in {args.config}"
                  " (restart the node to apply)")
    except (ValueError, OSError) as exc:
        print(f"fedws plan: {exc}", file=sys.stderr)
        return 2
    return 0


def _status_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status",
        help="show the nodes of a federation: up/down, latency, what they hold",
        description="A table of nodes: id, URL, up/down, latency, version, principals connected, "
        "objects and bytes held, memory budget used, plans stored, uptime. A private node shows a "
        "principal without the 'status' permission only its own session's numbers. Exit code 1 "
        "when a node is down (a healthcheck).",
    )
    p.add_argument("urls", nargs="*", metavar="URL",
                   help="node URLs (ws://host:port or wss://...; default ws://127.0.0.1:8777)")
    p.add_argument("--config", type=Path, metavar="DIR",
                   help="read the node URLs from the node configs (*.toml) in DIR (or one file)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per node) for scripts")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    p.add_argument("--token-file", type=Path, help="file holding the token (default: $FEDWS_TOKEN)")
    p.add_argument("--cafile", help="certificate (or CA) a wss:// node must present")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each node (default 5)")


def run_status(args: argparse.Namespace) -> int:
    import time

    from .status import format_table, query_all, read_token, to_json, urls_from_configs

    urls = list(args.urls)
    token = read_token(args.token_file)
    if args.config is not None:
        found, config_token = urls_from_configs(args.config)
        urls += found
        token = token or config_token
    if not urls:
        urls = ["ws://127.0.0.1:8777"]
    if args.watch is not None and not 0 < args.watch < float("inf"):
        raise ValueError("--watch takes a number of seconds > 0")
    while True:
        reports = query_all(urls, token, timeout=args.timeout, cafile=args.cafile)
        text = to_json(reports) if args.json else format_table(reports)
        if args.watch is None:
            print(text)
            return 0 if all(r.up for r in reports) else 1
        print(f"\x1b[2J\x1b[H{time.strftime('%H:%M:%S')}  fedws status (every {args.watch:g} s, Ctrl-C stops)\n"
              + text, flush=True)
        time.sleep(args.watch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedws",
        description="fedws: remote tensors, pointers and plans for federated learning.",
    )
    parser.add_argument("--version", action="version", version=f"fedws {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _worker_parser(sub)
    _up_parser(sub)
    _plan_parser(sub)
    _status_parser(sub)
    return parser


def _node_config(args: argparse.Namespace, base=None):  # type: ignore[no-untyped-def]
    from .node_config import NodeConfig, load_config

    if base is not None:  # one node of a host: its config is loaded, the options apply to it
        cfg = base
    elif args.config is not None:
        cfg = load_config(args.config)
    elif args.id:
        cfg = NodeConfig(id=args.id)
    else:
        raise SystemExit("fedws worker: give --id or --config")
    for name in ("id", "host", "port", "certfile", "keyfile", "max_frame_mb", "max_store_mb", "max_memory_mb",
                 "threads"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.token_file is not None:
        try:
            args.token = args.token_file.read_text().strip() or None
        except OSError as exc:
            raise SystemExit(f"fedws worker: cannot read token file {args.token_file}: {exc.strerror or exc}") from None
    cfg.token = args.token or os.environ.get("FEDWS_TOKEN") or cfg.token
    if args.insecure_dev:  # development: open policy and open peer links
        cfg.policy = "open"
        cfg.open_peers = True
    if args.audit_log:
        cfg.audit_log = args.audit_log
    if args.session_grace is not None:
        if not 0 <= args.session_grace < float("inf"):
            raise SystemExit("fedws worker: --session-grace takes a number of seconds >= 0")
        cfg.session_grace_s = args.session_grace
    for digest in args.approve_plan:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
            raise SystemExit(f"fedws worker: --approve-plan takes a 64-hex-digit sha256 digest, got {digest!r}")
        cfg.approved_plans.append(digest.lower())
    if bool(cfg.certfile) != bool(cfg.keyfile):
        raise SystemExit("fedws worker: --certfile and --keyfile go together")
    return cfg


def run_host(args: argparse.Namespace) -> int:
    """``fedws worker --nodes N`` or a config with ``[[node]]`` tables: one process, many nodes."""
    from .node_config import NodeConfig, load_configs
    from .node_host import NodeHost, node_configs, serve_host

    bases = load_configs(args.config) if args.config is not None else [NodeConfig(id=args.id or "node")]
    if args.nodes is not None and len(bases) > 1:
        raise SystemExit("fedws worker: give --nodes or a config with [[node]] tables, not both")
    if args.nodes is not None and args.id:
        raise SystemExit("fedws worker: --nodes names its nodes with --id-prefix, not --id")
    configs = [_node_config(args, base) for base in bases]
    audit = None
    if args.nodes is not None:
        audit = configs[0].audit_log
        configs = node_configs(configs[0], args.nodes, args.id_prefix)
    if configs[0].threads:
        import torch

        torch.set_num_threads(configs[0].threads)
    host = NodeHost(configs, audit_log=audit)
    if any(c.policy == "open" for c in configs):
        print(f"fedws worker: {INSECURE_WARNING}", file=sys.stderr, flush=True)
    ids = list(host.nodes)
    shown = " ".join(ids[:10]) + (f" ... {ids[-1]}" if len(ids) > 10 else "")

    def ready(url: str) -> None:
        print(f"fedws worker: {len(ids)} nodes at {url}/ID: {shown}", flush=True)
        print(f"fedws worker host-of-{len(ids)} listening on {url}", flush=True)

    if args.connect:  # every node dials the coordinator (tokens: fedws/node_host.py)
        from .exceptions import AuthenticationError
        from .node_host import dial_host

        def dialed(n: int) -> None:
            print(f"fedws worker: {n} nodes dialed {args.connect}: {shown}", flush=True)
            print(f"fedws worker host-of-{n} connected to {args.connect}", flush=True)

        try:
            dial_host(host, args.connect, cafile=args.cafile, ready=dialed)
        except (ValueError, AuthenticationError) as exc:
            print(f"fedws worker: {exc}", file=sys.stderr)
            return 2
        return 0

    try:
        serve_host(host, ready=ready)
    except OSError as exc:
        print(f"fedws worker: cannot listen on {host.server.host}:{host.server.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    return 0


def run_worker(args: argparse.Namespace) -> int:
    from .logs import configure
    from .node_process import NodeServer, serve

    configure(args.log_level, fmt=args.log_format, default=logging.DEBUG if args.verbose else logging.INFO)
    if args.nodes is not None or (args.config is not None and _has_node_tables(args.config)):
        return run_host(args)
    cfg = _node_config(args)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    try:
        server = NodeServer(cfg)
    except ValueError as exc:
        print(f"fedws worker: {exc}", file=sys.stderr)
        return 2

    if cfg.policy == "open":
        print(f"fedws worker {cfg.id}: {INSECURE_WARNING}", file=sys.stderr, flush=True)

    if args.connect:
        return _dial(server, args, cfg)

    def ready(url: str) -> None:
        print(f"fedws worker {cfg.id} listening on {url}", flush=True)

    try:
        serve(server, ready=ready)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = (f" (a node may already run there: `fedws status ws://{cfg.host}:{cfg.port}`; stop it, e.g. "
                    "`make workers-stop`, or choose another --port)")
        print(f"fedws worker: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}{hint}",
              file=sys.stderr)
        return 2
    return 0


def _dial(server, args: argparse.Namespace, cfg) -> int:  # type: ignore[no-untyped-def]
    """``fedws worker --connect URL``: the node dials its coordinator instead of listening."""
    from .node_process import dial

    token = cfg.token
    if not token:
        print("fedws worker: --connect needs the token shared with the coordinator (--token-file, --token "
              "or $FEDWS_TOKEN)", file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(f"fedws worker {cfg.id} connected to {url}", flush=True)

    dial(server, args.connect, token, cafile=args.cafile, ready=ready)
    return 0


def _has_node_tables(config: Path) -> bool:
    import tomllib

    try:
        return "node" in tomllib.loads(Path(config).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False  # load_config words the error


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error the user can fix is one line on stderr, exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"fedws {args.command}: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "worker":
        return run_worker(args)
    if args.command == "plan":
        return run_plan_command(args)
    if args.command == "status":
        return run_status(args)
    from .launch import down, up

    if args.command == "up":
        for n in up(args.configs, args.run_dir):
            note = "  (already running)" if n.already_running else ""
            print(f"{n.id}\t{n.url}\tpid {n.pid}{note}")
        return 0
    if args.command == "down":
        stopped = down(args.run_dir)
        print(f"stopped {stopped} node(s)" if stopped else f"no node was running (nothing in {args.run_dir})")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
