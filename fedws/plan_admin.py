"""``fedws plan show|approve``: the node operator's review of arriving plans.

A private node logs every plan that arrives (digest, name, who sent it, its readable code)
in its audit log. ``show`` lists them, or prints one plan's code; ``approve`` adds a digest
to ``[release] approved_plans`` of a node config (restart the node to apply it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["seen_plans", "show", "approve"]

_DIGEST = re.compile(r"[0-9a-f]{64}")


def seen_plans(audit_log: Path) -> dict[str, dict[str, Any]]:
    """Digest -> the last ``store_plan`` record of that plan in ``audit_log`` (and rotated files)."""
    files = sorted(audit_log.parent.glob(audit_log.name + ".*"), reverse=True) + [audit_log]
    plans: dict[str, dict[str, Any]] = {}
    for f in files:
        if not f.exists():
            continue
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") == "store_plan" and isinstance(rec.get("plan"), str):
                plans[rec["plan"]] = rec
    return plans


def show(audit_log: Path, digest: str | None = None) -> str:
    """The plans seen (one line each), or the code of the plan whose digest starts with ``digest``.

    Raises:
        ValueError: no plan matches, or several do.
    """
    plans = seen_plans(audit_log)
    if digest is None:
        if not plans:
            return f"no plan in {audit_log}"
        return "\n".join(
            f"{d}  {r.get('name')!s:<16} {'approved' if r.get('approved') else 'NOT approved':<13}"
            f" ops {r.get('ops')}  from {r.get('principal')}  {r.get('t')}"
            for d, r in plans.items()
        )
    matches = [d for d in plans if d.startswith(digest.lower())]
    if len(matches) != 1:
        raise ValueError(f"{len(matches)} plans in {audit_log} match {digest!r}")
    rec = plans[matches[0]]
    return f"# sha256 {matches[0]}  from {rec.get('principal')}  {rec.get('t')}\n{rec.get('code', '')}"


def approve(config: Path, digest: str) -> bool:
    """Add ``digest`` to ``[release] approved_plans`` in ``config``; False if it was there.

    Raises:
        ValueError: not a digest, or the config does not load afterwards (it is left unchanged).
    """
    from .node_config import load_config

    digest = digest.lower()
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"not a plan digest (64 hex digits): {digest!r}")
    before = load_config(config)
    if digest in before.approved_plans:
        return False
    text = config.read_text(encoding="utf-8")
    item = f'"{digest}"'
    m = re.search(r"^approved_plans\s*=\s*\[", text, re.M)
    if m is not None:
        new = text[: m.end()] + f"\n    {item}," + text[m.end():]
    elif re.search(r"^\[release\]\s*$", text, re.M):
        new = re.sub(r"^\[release\]\s*$", f"[release]\napproved_plans = [{item}]", text, count=1, flags=re.M)
    else:
        new = text.rstrip("\n") + f"\n\n[release]\napproved_plans = [{item}]\n"
    config.write_text(new, encoding="utf-8")
    try:
        if digest not in load_config(config).approved_plans:
            raise ValueError("the digest did not land in [release] approved_plans")
    except ValueError:
        config.write_text(text, encoding="utf-8")
        raise
    return True
