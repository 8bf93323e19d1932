"""The shape rules agree with torch's meta kernels wherever they answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fedws.protocol.shape_rules import TensorSpec, fresh_bytes, infer_by_rule

f32, f64, i64 = torch.float32, torch.float64, torch.int64


def meta(shape: tuple[int, ...], dtype: torch.dtype = f32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


# (wire name, callable, args with meta tensors, kwargs)
CASES: list[tuple[str, Any, tuple[Any, ...], dict[str, Any]]] = [
    ("Tensor.__add__", torch.Tensor.__add__, (meta((4, 1)), meta((3,))), {}),
    ("Tensor.__add__", torch.Tensor.__add__, (meta((2, 3), i64), 1.5), {}),
    ("Tensor.__add__", torch.Tensor.__add__, (meta((2, 3)), meta((), f64)), {}),
    ("Tensor.__mul__", torch.Tensor.__mul__, (meta((2, 3), i64), meta((3,), f64)), {}),
    ("torch.add", torch.add, (meta((5,)), meta((5,))), {"alpha": 2}),
    ("Tensor.__radd__", torch.Tensor.__radd__, (meta((2,)), 1), {}),
    ("Tensor.__truediv__", torch.Tensor.__truediv__, (meta((2,), i64), 2), {}),
    ("Tensor.__lt__", torch.Tensor.__lt__, (meta((2, 2)), 0), {}),
    ("torch.nn.functional.relu", F.relu, (meta((3, 4)),), {"inplace": False}),
    ("torch.nn.functional.linear", F.linear, (meta((7, 10)), meta((16, 10)), meta((16,))), {}),
    ("torch.nn.functional.linear", F.linear, (meta((2, 7, 10)), meta((16, 10))), {}),
    ("torch.matmul", torch.matmul, (meta((5,)), meta((5, 3))), {}),
    ("torch.matmul", torch.matmul, (meta((2, 1, 4, 5)), meta((3, 5, 6))), {}),
    ("Tensor.__matmul__", torch.Tensor.__matmul__, (meta((4, 5)), meta((5,))), {}),
    ("Tensor.sum", torch.Tensor.sum, (meta((3, 4)),), {}),
    ("Tensor.sum", torch.Tensor.sum, (meta((3, 4), i64), 1), {}),
    ("torch.mean", torch.mean, (meta((3, 4, 5)),), {"dim": (0, -1), "keepdim": True}),
    ("Tensor.view", torch.Tensor.view, (meta((3, 4)), -1, 2), {}),
    ("Tensor.reshape", torch.Tensor.reshape, (meta((3, 4)), (2, -1)), {}),
    ("torch.nn.functional.cross_entropy", F.cross_entropy, (meta((8, 3)), meta((8,), i64)), {}),
    ("torch.nn.functional.mse_loss", F.mse_loss, (meta((8, 3)), meta((8, 3))), {"reduction": "sum"}),
    ("Tensor.__getitem__", torch.Tensor.__getitem__, (meta((10, 3)), meta((4,), i64)), {}),
    ("Tensor.__getitem__", torch.Tensor.__getitem__, (meta((10, 3)), slice(2, None, 3)), {}),
    ("Tensor.__getitem__", torch.Tensor.__getitem__, (meta((10, 3)), -1), {}),
    ("Tensor.t", torch.Tensor.t, (meta((3, 4)),), {}),
    ("Tensor.flatten", torch.Tensor.flatten, (meta((2, 3, 4)), 1), {}),
    ("Tensor.detach", torch.Tensor.detach, (meta((2, 3)),), {}),
    ("torch.softmax", torch.softmax, (meta((2, 3)), 1), {}),
    ("torch.ones", torch.ones, (10, 4), {}),
    ("torch.zeros", torch.zeros, ((3,),), {"dtype": i64}),
    ("torch.zeros_like", torch.zeros_like, (meta((2, 5), f64),), {}),
    ("Tensor.to", torch.Tensor.to, (meta((4, 3), i64), f32), {}),  # the evaluation plan's cast
    ("Tensor.to", torch.Tensor.to, (meta((4, 3)),), {"dtype": f64}),
    ("Tensor.float", torch.Tensor.float, (meta((2,), i64),), {}),
    ("Tensor.long", torch.Tensor.long, (meta((2, 2)),), {}),
    ("Tensor.bool", torch.Tensor.bool, (meta((3,)),), {}),
    ("Tensor.argmax", torch.Tensor.argmax, (meta((8, 10)), 1), {}),  # the evaluation plan's prediction
    ("torch.argmax", torch.argmax, (meta((8, 10)),), {"dim": -1, "keepdim": True}),
    ("Tensor.argmin", torch.Tensor.argmin, (meta((8, 10)),), {}),
]


def _spec(x: Any) -> Any:
    return TensorSpec(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("name,fn,args,kwargs", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rule_matches_meta(name: str, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    out = fn(*args, **kwargs)
    assert infer_by_rule(name, [_spec(a) for a in args], {k: _spec(v) for k, v in kwargs.items()}) == _spec(out)


@pytest.mark.parametrize(
    "name,args,kwargs",
    [
        ("Tensor.__add__", (TensorSpec((2, 3), f32), TensorSpec((4,), f32)), {}),  # does not broadcast
        ("torch.nn.functional.linear", (TensorSpec((2, 3), f32), TensorSpec((4, 5), f32)), {}),
        ("torch.mean", (TensorSpec((2, 3), i64),), {}),  # torch raises: let it
        ("Tensor.view", (TensorSpec((3, 4), f32), 5, -1), {}),
        ("torch.nn.functional.cross_entropy", (TensorSpec((8, 3), f32), TensorSpec((8,), i64)), {"reduction": "none"}),
        ("Tensor.__getitem__", (TensorSpec((10, 3), f32), (0, 1)), {}),
        ("torch.conv2d", (TensorSpec((1, 1, 4, 4), f32),), {}),  # no rule
        ("Tensor.to", (TensorSpec((2,), f32), "cuda"), {}),  # a device: unsure
        ("fedws.set_grad", (TensorSpec((2,), f32), None), {}),
    ],
)
def test_unsure_gives_none(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    assert infer_by_rule(name, args, kwargs) is None


def test_fresh_bytes_counts_new_storage_only() -> None:
    x, w, idx = TensorSpec((8, 10), f32), TensorSpec((16, 10), f32), TensorSpec((4,), i64)
    assert fresh_bytes("torch.nn.functional.linear", [x, w], {}) == 8 * 16 * 4
    assert fresh_bytes("Tensor.__getitem__", [x, idx], {}) == 4 * 10 * 4  # a gather copies
    assert fresh_bytes("Tensor.__getitem__", [x, slice(0, 2)], {}) is None  # a view: meta decides
    assert fresh_bytes("Tensor.add_", [x, TensorSpec((10,), f32)], {"alpha": 2}) == 0
    assert fresh_bytes("Tensor.add_", [x, TensorSpec((3,), f32)], {}) is None
    assert fresh_bytes("torch.conv2d", [x], {}) is None
