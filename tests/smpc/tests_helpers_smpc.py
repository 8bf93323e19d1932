"""Linking workers for tests of node-to-node moves (shares, triples)."""

from __future__ import annotations

from fedws.client.worker import Worker


def link(*workers: Worker) -> None:
    """Every worker knows every other (real nodes: add_worker, which --insecure-dev allows)."""
    for a in workers:
        for b in workers:
            if a is not b:
                a.add_worker(b)
