"""``make fuzz``: a long fuzz run of the decoder and ``Node.handle``, crash-isolated.

``python bench/fuzz.py [--frames 1000000] [--batch 20000] [--seed 1] [--hang-s 2]``

Frames are generated from a seeded ``random.Random``: structured requests (a valid envelope
with random kinds, fields, op names and ext values), mutations of valid frames (bit flips,
byte writes, truncations, extensions, length fields that lie, splices), raw random bytes and
deep nestings. Every frame goes through ``codec.decode`` (each blob) and ``Node.handle``;
the reply must decode as ``[watermark, values, errors]``.

Batches run in child processes, so a segfault or an OOM kill is *counted* (and the next
batch starts) instead of killing the run. A child that makes no progress for 30 s is killed
and counted as a hang; a single frame slower than ``--hang-s`` is counted as a slow frame.
Each child reports its RSS after warm-up and at the end (growth = leak suspicion).

``--live`` fuzzes a node process instead: it starts ``fedws worker`` on 127.0.0.1 and sends
the same frames over a WebSocket, one reply awaited per frame. After each ``--batch`` it
(at most 1000 frames) pings the node (no answer within 30 s: a hang; the node is
restarted), clears the store and
reads the node's RSS from ``/proc/<pid>/status``; a node that exits is counted as a death
and restarted, a closed connection is counted and reopened. It stops after ``--frames``.

Numbers are small on purpose (ints in [-8, 16], floats in [-10, 10], short lists): the
allocation attacks (``torch.ones(2**32)``) are the node's memory budget's job, not this
fuzzer's. Findings (frames that crashed a child) are written to ``--out`` for replay.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROGRESS_EVERY = 500
STALL_S = 30.0


# -- frame generation (child side) ---------------------------------------------------------


def _gen(rng: random.Random) -> Any:
    import msgpack
    import torch

    from fedws.exceptions import EncodeError
    from fedws.protocol import codec
    from fedws.protocol.codec import ObjRef, PointerRef
    from fedws.protocol.messages import Kind
    from fedws.protocol.ops import FEDWS_OPS, OPS

    op_names = sorted(OPS) + sorted(FEDWS_OPS) + ["torch.save", "os.system", "", "Tensor.set_"]
    dtypes = [torch.float32, torch.float64, torch.int64, torch.bool, torch.bfloat16, torch.complex64]
    head = struct.Struct("<IIQ")

    def tensor() -> torch.Tensor:
        n = rng.randint(0, 6)
        shape = [n] if rng.random() < 0.6 else [rng.randint(0, 3), rng.randint(0, 3)]
        dt = rng.choice(dtypes)
        t = (torch.rand(shape) * 10).to(dt) if dt is not torch.bool else torch.rand(shape) > 0.5
        if dt.is_floating_point and rng.random() < 0.2:
            t.requires_grad_(True)
        return t

    def value(depth: int = 0) -> Any:
        r = rng.random()
        if depth > 3 or r < 0.35:
            return rng.choice(
                [
                    lambda: rng.randint(-8, 16),
                    lambda: rng.uniform(-10, 10),
                    lambda: rng.choice(["sum", "mean", "x", "", "constant", "ij,jk->ik", "fro"]),
                    lambda: None,
                    lambda: rng.random() < 0.5,
                    lambda: ObjRef(rng.choice([10, 11, 12, 13, rng.getrandbits(63)])),
                    lambda: rng.randbytes(rng.randint(0, 8)),
                    lambda: rng.choice(dtypes),
                    lambda: Ellipsis,
                    lambda: complex(rng.uniform(-2, 2), rng.uniform(-2, 2)),
                    lambda: slice(rng.randint(-3, 3), rng.choice([None, rng.randint(-3, 5)]), None),
                    lambda: torch.strided,
                ]
            )()
        if r < 0.55:
            return tensor()
        n = rng.randint(0, 3)
        if r < 0.7:
            return [value(depth + 1) for _ in range(n)]
        if r < 0.8:
            return tuple(value(depth + 1) for _ in range(n))
        if r < 0.9:
            return {rng.choice(["dim", "keepdim", "alpha", "out", "dtype", "p", "x"]): value(depth + 1)
                    for _ in range(n)}
        if r < 0.95:
            return PointerRef("peer", None, rng.getrandbits(32), rng.getrandbits(32), (2,), "float32", False)
        return {rng.choice([rng.randint(-8, 16), "a", "b", 2.5]) for _ in range(n)}

    def request(seq: int) -> list[Any]:
        kind = rng.choice([int(k) for k in Kind] + [0, 99, -1])
        if kind == Kind.CMD:
            fields: list[Any] = [
                rng.choice(op_names) if rng.random() < 0.95 else value(),
                [value() for _ in range(rng.randint(0, 3))],
                {} if rng.random() < 0.7 else value(2),
                [rng.randint(20, 40) for _ in range(rng.randint(0, 2))],
            ]
            if rng.random() < 0.2:
                fields.append(rng.random() < 0.5)
        elif kind == Kind.STORE:
            fields = [rng.choice([10, 11, 12, 13, 50]), value(), [], rng.choice([None, "d"])]
        elif kind == Kind.GET:
            fields = [rng.choice([10, 11, 12, 20, 21, 99]), rng.random() < 0.3]
        else:
            fields = [value() for _ in range(rng.randint(0, 4))]
        return [kind, seq, *fields]

    def structured() -> bytes:
        return b"".join(codec.encode_bytes(request(i + 1)) for i in range(rng.randint(1, 4)))

    def mutate(frame: bytes) -> bytes:
        b = bytearray(frame)
        for _ in range(rng.randint(1, 4)):
            m = rng.randrange(7)
            if m == 0 and b:  # bit flip
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            elif m == 1 and b:  # byte write (msgpack type bytes are interesting)
                b[rng.randrange(len(b))] = rng.choice([0xC1, 0xDD, 0xDF, 0xC9, 0xD4, 0xFF, 0x00, 0x91, rng.randrange(256)])
            elif m == 2:  # truncate
                del b[rng.randrange(len(b) + 1) :]
            elif m == 3:  # extend
                b += rng.randbytes(rng.randint(1, 32))
            elif m == 4 and len(b) >= 16:  # a length field that lies
                field = rng.choice([(0, "<I"), (4, "<I"), (8, "<Q")])
                big = rng.choice([0, 1, 63, 64, 2**31, 2**32 - 1] if field[1] == "<I" else [0, 1, 2**63, 2**64 - 1])
                struct.pack_into(field[1], b, field[0], big)
            elif m == 5 and b:  # splice with itself
                i = rng.randrange(len(b))
                b[i:i] = b[: rng.randrange(len(b) + 1)]
            elif m == 6 and len(b) > 16:  # insert a declared-huge container into the envelope
                i = rng.randrange(16, len(b))
                b[i:i] = rng.choice([b"\xdd\x7f\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xf0\x01"])
        return bytes(b)

    def nested() -> bytes:
        depth = rng.choice([10, 31, 32, 33, 64, 200, 1000])
        inner = msgpack.packb(1)
        ext = rng.choice([codec.EXT_TUPLE, codec.EXT_SET, codec.EXT_TENSOR, codec.EXT_SLICE, codec.EXT_POINTER])
        for _ in range(depth):
            if rng.random() < 0.5:
                inner = msgpack.packb(msgpack.ExtType(ext, b"\x91" + inner))
            else:
                inner = b"\x91" + inner
        env = rng.choice([inner, b"\x94\x01\x05\xa9torch.add" + inner])
        return head.pack(len(env), 0, 0) + env

    def valid() -> bytes:
        while True:
            try:
                return structured()
            except EncodeError:  # a generated value that cannot travel (a set of tensors ...)
                continue

    def frame() -> bytes:
        r = rng.random()
        if r < 0.5:
            return valid()
        if r < 0.9:
            return mutate(valid())
        if r < 0.95:
            return rng.randbytes(rng.randint(0, 64))
        return nested()

    return frame


def child(seed: int, frames: int, hang_s: float) -> None:
    """Run ``frames`` frames; print JSON progress lines; die however the frames make it die."""
    import logging
    import resource

    import torch

    logging.disable(logging.CRITICAL)  # the node logs every rejected frame
    torch.set_num_threads(1)
    from fedws.exceptions import DecodeError
    from fedws.node import Node
    from fedws.protocol import codec
    from fedws.protocol.messages import Kind

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    rng = random.Random(seed)
    gen = _gen(rng)

    def fresh() -> Node:
        node = Node("fuzz")
        for i, t in enumerate((torch.ones(3), torch.arange(6.0).reshape(2, 3), torch.zeros(4, dtype=torch.int64),
                               torch.ones(2, 2, requires_grad=True))):
            node.handle(codec.encode_bytes([int(Kind.STORE), i + 1, 10 + i, t, [], None]))
        return node

    node = fresh()
    rss0 = None
    stats = {"frames": 0, "slow": 0, "bad_decode": 0, "bad_handle": 0, "max_frame_s": 0.0}
    last_frame = b""
    t_start = time.perf_counter()
    for i in range(frames):
        if i % 1000 == 0:
            node = fresh()  # results accumulate in the store; keep memory about the codec/node
        if i == 2000:
            rss0 = rss_mb()
        frame = last_frame = gen()
        t0 = time.perf_counter()
        try:
            for blob in codec.iter_blobs(frame):
                try:
                    codec.decode(blob)
                except DecodeError:
                    pass
        except DecodeError:
            pass
        except Exception as exc:  # noqa: BLE001 - counted: decode may raise only DecodeError
            stats["bad_decode"] += 1
            sys.stderr.write(f"decode raised {type(exc).__name__}: {exc!r:.200} on hex {frame[:65536].hex()}\n")
        try:
            reply = codec.decode(b"".join(node.handle(frame)))
            if not (isinstance(reply, list) and len(reply) == 3):
                raise ValueError(f"reply {reply!r:.100}")
        except Exception as exc:  # noqa: BLE001 - counted: handle must never raise
            stats["bad_handle"] += 1
            sys.stderr.write(f"handle raised {type(exc).__name__}: {exc!r:.200} on hex {frame[:65536].hex()}\n")
        dt = time.perf_counter() - t0
        stats["max_frame_s"] = max(stats["max_frame_s"], dt)
        if dt > hang_s:
            stats["slow"] += 1
            sys.stderr.write(f"slow frame ({dt:.1f} s): hex {frame[:65536].hex()}\n")
        stats["frames"] = i + 1
        if (i + 1) % PROGRESS_EVERY == 0:
            print(json.dumps({"progress": i + 1, "last": last_frame[:4096].hex()}), flush=True)
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({**stats, "rss0_mb": rss0, "rss1_mb": rss_mb(), "maxrss_mb": maxrss,
                      "seconds": time.perf_counter() - t_start}), flush=True)


# -- the runner (parent side) ------------------------------------------------------------------


def run(total: int, batch: int, seed: int, hang_s: float, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    totals = {"frames": 0, "crashes": 0, "hangs": 0, "slow": 0, "bad_decode": 0, "bad_handle": 0,
              "children": 0, "runner_errors": 0, "rss_growth_mb": [], "maxrss_mb": 0.0, "max_frame_s": 0.0}
    start = time.perf_counter()
    done = 0
    while done < total:
        n = min(batch, total - done)
        child_seed = seed * 1_000_003 + totals["children"]
        totals["children"] += 1
        err_path = out.with_suffix(".stderr")
        with err_path.open("w") as err_file:
            proc = subprocess.Popen(
                [sys.executable, "-W", "ignore", __file__, "--child", "--seed", str(child_seed), "--frames", str(n),
                 "--hang-s", str(hang_s)],
                stdout=subprocess.PIPE, stderr=err_file, env=env, cwd=ROOT,
            )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        progress, last, result = 0, "", None
        buf = b""
        last_change = time.monotonic()
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            chunk = os.read(fd, 1 << 20) if ready else b""
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if "progress" in msg:
                        progress, last = msg["progress"], msg["last"]
                        last_change = time.monotonic()
                    else:
                        result = msg
            elif ready or proc.poll() is not None:  # EOF: the child is gone
                break
            if time.monotonic() - last_change > STALL_S:
                proc.kill()
                totals["hangs"] += 1
                break
        proc.wait()
        proc.stdout.close()
        err = err_path.read_text(errors="replace")
        err_path.unlink()
        if err.strip():
            with out.open("a") as f:
                f.write(f"# child seed {child_seed}\n{err[-20000:]}\n")
        if result is not None:
            totals["frames"] += result["frames"]
            for k in ("slow", "bad_decode", "bad_handle"):
                totals[k] += result[k]
            if result["rss0_mb"] is not None:
                totals["rss_growth_mb"].append(round(result["rss1_mb"] - result["rss0_mb"], 1))
            totals["maxrss_mb"] = max(totals["maxrss_mb"], result["maxrss_mb"])
            totals["max_frame_s"] = max(totals["max_frame_s"], result["max_frame_s"])
            done += n
        else:  # died: count it, keep the frames it survived, and go on with a new seed
            rc = proc.returncode
            if rc is not None and rc < 0 and rc != -9:  # killed by a signal: SIGSEGV, SIGABRT ...
                totals["crashes"] += 1
            elif rc != -9:  # -9 is our own kill of a hang (counted above) or the OOM killer
                totals["runner_errors"] += 1
                if totals["runner_errors"] >= 3:
                    print(f"the fuzzer itself fails (see {out}); stopping", flush=True)
                    break
            totals["frames"] += progress
            done += max(progress, 1)
            with out.open("a") as f:
                f.write(f"# child seed {child_seed} died rc={proc.returncode} after {progress} frames; "
                        f"a frame near the end (hex): {last}\n")
        elapsed = time.perf_counter() - start
        print(f"{totals['frames']:>9} frames  {totals['frames'] / elapsed:8.0f} frames/s  crashes {totals['crashes']}  "
              f"hangs {totals['hangs']}  slow {totals['slow']}  bad {totals['bad_decode'] + totals['bad_handle']}  "
              f"rss growth/child {totals['rss_growth_mb'][-1:] or '-'} MB", flush=True)
    totals["seconds"] = round(time.perf_counter() - start, 1)
    totals["frames_per_s"] = round(totals["frames"] / totals["seconds"])
    return totals


def live(total: int, batch: int, seed: int, hang_s: float, out: Path) -> dict[str, Any]:
    """Fuzz a live node process over a WebSocket: deaths, hangs, closes and RSS growth."""
    import logging

    sys.path.insert(0, str(ROOT))
    logging.disable(logging.CRITICAL)
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from fedws.launch import NodeProcess, start_node
    from fedws.protocol import codec
    from fedws.protocol.messages import Kind

    def rss_mb(pid: int) -> float:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def alive(node: NodeProcess) -> bool:
        return node.process is not None and node.process.poll() is None

    gen = _gen(random.Random(seed))
    totals: dict[str, Any] = {"frames": 0, "node_deaths": 0, "hangs": 0, "slow": 0, "closed_connections": 0,
                              "pings": 0, "rss_mb": [], "max_frame_s": 0.0}
    ping = codec.encode_bytes([int(Kind.PING), 1])
    clear = codec.encode_bytes([int(Kind.CLEAR), 1])
    start = time.perf_counter()

    def fresh() -> NodeProcess:
        return start_node(id="fuzz", port=0, extra_args=["--threads", "1", "--max-store-mb", "256"])

    node = fresh()
    ws = None
    try:
        rss0 = None
        while totals["frames"] < total:
            if ws is None:
                ws = connect(node.url, max_size=2**30, compression=None, open_timeout=30)
            try:
                for _ in range(min(batch, total - totals["frames"])):
                    frame = gen()
                    t0 = time.perf_counter()
                    ws.send(frame)
                    try:
                        ws.recv(timeout=STALL_S)
                    except TimeoutError:
                        totals["hangs"] += 1
                        with out.open("a") as f:
                            f.write(f"# live: no reply within {STALL_S} s to hex {frame[:4096].hex()}\n")
                        raise
                    dt = time.perf_counter() - t0
                    totals["max_frame_s"] = max(totals["max_frame_s"], dt)
                    totals["slow"] += dt > hang_s
                    totals["frames"] += 1
                for probe in (ping, clear):
                    ws.send(probe)
                    ws.recv(timeout=STALL_S)
                totals["pings"] += 1
            except (ConnectionClosed, TimeoutError, OSError):
                ws.close()
                ws = None
                if not alive(node):
                    totals["node_deaths"] += 1
                    with out.open("a") as f:
                        f.write(f"# live: the node died (rc {node.process.returncode if node.process else '?'})\n")
                    node.stop()
                    node, rss0 = fresh(), None
                elif totals["hangs"]:
                    node.stop()
                    node, rss0 = fresh(), None
                else:
                    totals["closed_connections"] += 1
                continue
            rss = rss_mb(node.pid)
            if rss0 is None:
                rss0 = rss
            totals["rss_mb"].append(round(rss, 1))
            elapsed = time.perf_counter() - start
            print(f"{totals['frames']:>8} frames  {totals['frames'] / elapsed:6.0f} frames/s  deaths "
                  f"{totals['node_deaths']}  hangs {totals['hangs']}  closes {totals['closed_connections']}  "
                  f"rss {rss:.0f} MB (first {rss0:.0f})", flush=True)
    finally:
        if ws is not None:
            ws.close()
        node.stop()
    rss = totals.pop("rss_mb")
    totals["rss_first_mb"], totals["rss_last_mb"] = (rss[0], rss[-1]) if rss else (None, None)
    totals["rss_max_mb"] = max(rss) if rss else None
    totals["seconds"] = round(time.perf_counter() - start, 1)
    totals["frames_per_s"] = round(totals["frames"] / totals["seconds"])
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hang-s", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("fuzz-findings.txt"))
    ap.add_argument("--live", action="store_true", help="fuzz a node process over a WebSocket")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.seed, args.frames, args.hang_s)
        return
    if args.live:
        result = live(args.frames, min(args.batch, 1000), args.seed, args.hang_s, args.out)
        print(json.dumps(result))
        sys.exit(1 if result["node_deaths"] + result["hangs"] else 0)
    totals = run(args.frames, args.batch, args.seed, args.hang_s, args.out)
    print(json.dumps(totals))
    bad = totals["crashes"] + totals["hangs"] + totals["bad_decode"] + totals["bad_handle"] + totals["runner_errors"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
