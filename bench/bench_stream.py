"""Tensors larger than one frame, and optional compression (issue 12).

Streaming: a node started with a small frame limit (full run: 64 MiB; ``--quick``: 4 MiB)
receives a tensor larger than the limit (full: 4 GB float32 if >= 10 GB of memory is
available, else 1 GB; quick: 64 MiB) with ``ptr = t.send(node)`` and gives it back with
``ptr.get()``: both directions go in chunks. Peak resident memory (VmHWM, reset through
``/proc/PID/clear_refs`` before the transfer) of the coordinator and the node minus their
resident size before it, minus the tensor itself, is the memory the transfer cost beyond
the tensor: bounded by a few chunks, whatever the tensor's size. Throughput is compared
with a plain single-frame send + get of the largest tensor that still fits one frame
(half the limit), timed in the same run.

Compression: the same payloads sent and got back over a link with ``compress=True`` and
one without, to the same node: float32 model weights, a bfloat16 delta and a sparse
int8 delta. Bytes on the wire are what the link's ``deflate`` makes of each frame; wall
times are medians of 3. A slow link is modelled (not emulated on the socket): wall time
plus the bytes both ways at 100 Mbit/s and 1 Gbit/s, to show where compressing pays.

Run: ``python bench/bench_stream.py [--quick]``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fedws as sy
from fedws.launch import start_node
from fedws.protocol import codec
from fedws.transport import compress

MiB = 1 << 20


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) << 10
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) << 10
    return 0


def _connect(url: str, node_id: str = "bench-stream", **kw: object) -> sy.WebsocketClientWorker:
    return sy.WebsocketClientWorker(
        sy.TorchHook(torch, federation=sy.Federation()), url=url, id=node_id, timeout=600.0, **kw
    )


def bench_streaming(size: int, frame_mb: int) -> None:
    node = start_node(
        id="bench-stream", port=0,
        extra_args=["--max-frame-mb", str(frame_mb), "--max-memory-mb", str(2 * size // MiB + 1024), "--threads", "1"],
    )
    me = Path("/proc/self")
    try:
        w = _connect(node.url, max_frame_mb=float(frame_mb), compress=False)
        assert w.link.stream_above is not None
        plain = w.link.stream_above  # the largest tensor that goes as one frame
        t = torch.ones(plain // 4)
        t.send(w).get()  # warm up
        plain_s = []
        for _ in range(3):
            start = time.perf_counter()
            back = t.send(w).get()
            plain_s.append(time.perf_counter() - start)
        del back, t
        w.ping()
        c_base, n_base = _status(int(me.resolve().name), "VmRSS"), _status(node.pid, "VmRSS")
        src = torch.empty(size // 4).fill_(1.5)  # freed before the get allocates its copy
        _reset_peak(int(me.resolve().name))
        _reset_peak(node.pid)
        start = time.perf_counter()
        ptr = src.send(w)
        w.ping()
        send_s = time.perf_counter() - start
        del src  # the coordinator now holds only what the get allocates
        start = time.perf_counter()
        got = ptr.get()
        get_s = time.perf_counter() - start
        assert got.numel() == size // 4 and float(got[-1]) == 1.5
        c_peak, n_peak = _status(int(me.resolve().name), "VmHWM"), _status(node.pid, "VmHWM")
        w.close()
    finally:
        node.stop()
    c_over, n_over = c_peak - c_base - size, n_peak - n_base - size
    gb = size / 1e9
    plain_gbs = 2 * plain / 1e9 / statistics.median(plain_s)
    print(f"streaming: {size / MiB:.0f} MiB float32 tensor, {frame_mb} MiB frame limit "
          f"(chunks of {w.link.chunk_bytes / MiB:g} MiB)")
    print(f"  peak memory beyond the tensor: coordinator {c_over / MiB:.0f} MiB "
          f"({c_over / size:.1%} of the tensor), node {n_over / MiB:.0f} MiB ({n_over / size:.1%})")
    print(f"  send {send_s:.2f} s ({gb / send_s:.2f} GB/s), get {get_s:.2f} s ({gb / get_s:.2f} GB/s), "
          f"both {2 * gb / (send_s + get_s):.2f} GB/s")
    print(f"  baseline: plain send + get of {plain / MiB:.0f} MiB in one frame: {plain_gbs:.2f} GB/s "
          f"-> streamed/plain throughput ratio {2 * gb / (send_s + get_s) / plain_gbs:.2f}")


def _payloads(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=g) * 0.05
    delta = (torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16)
    keep = torch.rand(n, generator=g) < 0.1
    sparse = (torch.randint(-127, 128, (n,), generator=g, dtype=torch.int16) * keep).to(torch.int8)
    return {"float32 weights": w, "bfloat16 delta": delta, "int8 sparse delta (10% nonzero)": sparse}


def bench_compression(n: int) -> None:
    if not compress.available():
        print("compression: zstandard is not installed (pip install fedws[compress]); skipped")
        return
    node = start_node(id="bench-zstd", port=0, extra_args=["--threads", "1"])
    try:
        on, off = _connect(node.url, "bench-zstd", compress=True), _connect(node.url, "bench-zstd", compress=False)
        assert on.link.compressed and not off.link.compressed
        print(f"compression (zstd level 1, {n / 1e6:g}M elements; ratio = with / without):")
        print(f"  {'payload':34} {'raw MiB':>8} {'wire':>6} {'wall':>6} {'@1Gb/s':>7} {'@100Mb/s':>8}")
        for name, t in _payloads(n).items():
            frame = codec.encode(t)
            raw = sum(len(c) for c in frame)
            start = time.perf_counter()
            wire = sum(len(c) for c in compress.deflate(frame))
            deflate_s = time.perf_counter() - start
            walls = {}
            for label, w in (("on", on), ("off", off)):
                t.send(w).get()  # warm up
                runs = []
                for _ in range(3):
                    start = time.perf_counter()
                    back = t.send(w).get()
                    runs.append(time.perf_counter() - start)
                assert torch.equal(back, t)
                walls[label] = statistics.median(runs)
            ratio = wire / raw

            def at(bps: float, wire: int = wire, raw: int = raw, walls: dict[str, float] = walls) -> float:
                return (walls["on"] + 2 * wire * 8 / bps) / (walls["off"] + 2 * raw * 8 / bps)

            print(f"  {name:34} {raw / MiB:8.1f} {ratio:6.2f} {walls['on'] / walls['off']:6.2f} "
                  f"{at(1e9):7.2f} {at(1e8):8.2f}   (deflate alone {deflate_s * 1e3:.0f} ms)")
        on.close()
        off.close()
    finally:
        node.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB over 4 MiB frames; 1M-element payloads")
    args = ap.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        print("bench_stream: needs Linux /proc; skipped")
        return 0
    if args.quick:
        bench_streaming(64 * MiB, 4)
        bench_compression(1 << 20)
        return 0
    free = available_bytes()
    size = 4000 * MiB if free >= 10 << 30 else 1024 * MiB
    if size < 4000 * MiB:
        print(f"only {free / 2**30:.1f} GiB available (< 10 GiB): streaming 1 GiB instead of 4 GB")
    bench_streaming(size, 64)
    bench_compression(16 << 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
