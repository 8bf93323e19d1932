"""Plans: every code cell of the plans tutorial (seed 000), then what the issue adds.

Tests use ``make_worker`` so they also run against WebSocket nodes once that transport
lands; data goes to workers as tagged tensors found with ``search``.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fedws as sy
from fedws.plans import MultiPointerPlan, Plan, PointerPlan, State, func2plan
from fedws.protocol.messages import Kind

# -- the seed tutorial ----------------------------------------------------------------------


@pytest.fixture
def devices(make_worker):
    device_1, device_2 = make_worker("device_1"), make_worker("device_2")
    kept = []  # the data stays on the devices while these owning pointers live
    for d in (device_1, device_2):
        kept.append(torch.tensor([-1, 2.0]).tag("input_data").send(d))
        kept.append(torch.tensor([1, -2.0]).tag("input_data2").send(d))
    yield device_1, device_2
    del kept


class Net(Plan):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


def _double_abs():
    @func2plan()
    def plan_double_abs(x):
        x = x + x
        x = torch.abs(x)
        return x

    return plan_double_abs


def test_seed_virtual_worker_with_data(hook):
    x11 = torch.tensor([-1, 2.0]).tag("input_data")
    x12 = torch.tensor([1, -2.0]).tag("input_data2")
    device_1 = sy.VirtualWorker(hook, id="device_1", data=(x11, x12))
    plan = _double_abs()
    plan.build(torch.tensor([1.0, -2.0]))
    ptr = plan.send(device_1)(device_1.search("input_data")[0])
    assert torch.equal(ptr.get(), torch.tensor([2.0, 4.0]))


def test_seed_basic_plan(devices):
    device_1, _ = devices
    plan_double_abs = _double_abs()
    assert isinstance(plan_double_abs, Plan)
    assert "plan_double_abs" in repr(plan_double_abs)

    pointer_to_data = device_1.search("input_data")[0]
    assert "device_1" in repr(pointer_to_data)
    assert plan_double_abs.is_built is False
    with pytest.raises(RuntimeError, match="build"):
        plan_double_abs.send(device_1)

    out = plan_double_abs.build(torch.tensor([1.0, -2.0]))
    assert torch.equal(out, torch.tensor([2.0, 4.0]))
    assert plan_double_abs.is_built

    pointer_plan = plan_double_abs.send(device_1)
    assert isinstance(pointer_plan, PointerPlan)
    assert repr(pointer_plan).startswith("[PointerPlan | me:") and "-> device_1:" in repr(pointer_plan)

    pointer_to_result = pointer_plan(pointer_to_data)
    assert isinstance(pointer_to_result, sy.PointerTensor)
    assert "device_1" in str(pointer_to_result)
    assert torch.equal(pointer_to_result.get(), torch.tensor([2.0, 4.0]))


def test_seed_net_plan(devices):
    device_1, _ = devices
    net = Net()
    assert "Net" in repr(net) and "fc1" in repr(net) and "not built" in repr(net)
    net.build(torch.tensor([1.0, 2.0]))
    assert "built" in repr(net)
    pointer_to_net = net.send(device_1)
    assert "device_1" in repr(pointer_to_net)
    pointer_to_data = device_1.search("input_data")[0]
    pointer_to_result = pointer_to_net(pointer_to_data)
    assert "device_1" in repr(pointer_to_result)
    result = pointer_to_result.get()
    expected = net.forward(torch.tensor([-1, 2.0]))
    assert torch.allclose(result, expected)
    assert torch.allclose(result.exp().sum(), torch.tensor(1.0))


def test_seed_switch_between_workers(devices):
    device_1, device_2 = devices
    net = Net()
    net.build(torch.tensor([1.0, 2.0]))
    expected = net.forward(torch.tensor([-1, 2.0])).detach()

    pointer_to_net_1 = net.send(device_1)
    pointer_to_data = device_1.search("input_data")[0]
    assert torch.allclose(pointer_to_net_1(pointer_to_data).get(), expected)

    pointer_to_net_2 = net.send(device_2)
    pointer_to_data = device_2.search("input_data")[0]
    assert torch.allclose(pointer_to_net_2(pointer_to_data).get(), expected)


def test_seed_args_shape_builds_at_once():
    @func2plan(args_shape=[(-1, 1)])
    def plan_double_abs(x):
        x = x + x
        x = torch.abs(x)
        return x

    assert plan_double_abs.is_built

    @func2plan(args_shape=[(1, 2), (-1, 2)])
    def plan_sum_abs(x, y):
        s = x + y
        return torch.abs(s)

    assert plan_sum_abs.is_built


def test_seed_state(devices):
    device_1, _ = devices

    @func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    def plan_abs(x, state):
        (bias,) = state.read()
        x = x.abs()
        return x + bias

    pointer_plan = plan_abs.send(device_1)
    x_ptr = torch.tensor([-1, 0]).send(device_1)
    p = pointer_plan(x_ptr)
    assert p.shape == (2,) and p.dtype == torch.int64  # worked out locally, on meta tensors
    assert torch.equal(p.get(), torch.tensor([2, 1]))


# -- calling ---------------------------------------------------------------------------------


def test_one_message_per_call_and_fresh_results(make_worker):
    bob = make_worker("bob")
    plan = _double_abs()
    plan.build(torch.tensor([1.0]))
    pp = plan.send(bob)
    x = torch.tensor([-3.0, 1.0]).send(bob)
    bob.ping()
    before = bob.session.messages_sent
    r1 = pp(x)
    r2 = pp(x)
    r2.wait()  # the node has run both; waiting sends nothing
    assert bob.session.messages_sent - before == 2
    assert r1.id_at_location != r2.id_at_location
    assert torch.equal(r1.get(), torch.tensor([6.0, 2.0]))
    assert torch.equal(r2.get(), torch.tensor([6.0, 2.0]))


def test_run_plan_message_shape(hook, make_worker):
    bob = make_worker("bob")
    plan = _double_abs()
    plan.build(torch.tensor([1.0]))
    pp = plan.send(bob)
    x = torch.tensor([1.0]).send(bob)
    sent = []
    real_submit = bob.session.submit

    def spy(kind, *fields, **kw):
        sent.append((kind, fields))
        return real_submit(kind, *fields, **kw)

    bob.session.submit = spy
    r = pp(x)
    kind, (plan_id, args, result_ids) = sent[0]
    assert kind == Kind.RUN_PLAN and plan_id == pp.id_at_location
    assert args[0].id == x.id_at_location and result_ids == [r.id_at_location]


def test_several_outputs_give_a_tuple(make_worker):
    bob = make_worker("bob")

    @func2plan(args_shape=[(2,)])
    def split(x):
        return x + 1, x * 2

    a, b = split.send(bob)(torch.tensor([1.0, 2.0]).send(bob))
    assert torch.equal(a.get(), torch.tensor([2.0, 3.0]))
    assert torch.equal(b.get(), torch.tensor([2.0, 4.0]))


def test_wrong_arg_count_names_expected(make_worker):
    bob = make_worker("bob")

    @func2plan(args_shape=[(2,), (2,)])
    def add(x, y):
        return x + y

    pp = add.send(bob)
    x = torch.tensor([1.0, 2.0]).send(bob)
    with pytest.raises(TypeError, match="takes 2 arguments, got 1"):
        pp(x)
    with pytest.raises(TypeError, match="takes 2 arguments"):
        add(torch.ones(2))


def test_pointer_on_other_worker_is_refused(make_worker):
    bob, alice = make_worker("bob"), make_worker("alice")
    pp = _double_abs()
    pp.build(torch.ones(1))
    with pytest.raises(sy.LocationError):
        pp.send(bob)(torch.ones(1).send(alice))


def test_local_call_matches_function():
    def f(x, y):
        z = torch.matmul(x, y.t()).relu()
        return z.sum(dim=1) - x.mean()

    plan = func2plan()(f)
    x, y = torch.randn(3, 4), torch.randn(5, 4)
    plan.build(x, y)
    x2, y2 = torch.randn(3, 4), torch.randn(5, 4)
    assert torch.allclose(plan(x2, y2), f(x2, y2))


def test_unbuilt_plan_builds_on_first_local_call():
    plan = _double_abs()
    assert torch.equal(plan(torch.tensor([-1.0])), torch.tensor([2.0]))
    assert plan.is_built


def test_calling_plan_with_pointer_sends_it(make_worker):
    bob = make_worker("bob")
    plan = _double_abs()
    plan.build(torch.ones(2))
    x = torch.tensor([-1.0, 3.0]).send(bob)
    assert torch.equal(plan(x).get(), torch.tensor([2.0, 6.0]))


def test_code_is_readable():
    plan = _double_abs()
    plan.build(torch.ones(2))
    text = plan.code
    assert text.startswith("def plan_double_abs(arg_1):")
    assert "torch.abs(" in text and "return" in text
    assert str(plan) == text


def test_sizes_are_reread_on_the_worker(make_worker):
    bob = make_worker("bob")

    @func2plan(args_shape=[(-1, 2, 2)])
    def flatten(x):
        return x.view(x.shape[0], -1) + torch.zeros(x.size(0), 4)

    x = torch.arange(24.0).reshape(6, 2, 2)
    r = flatten.send(bob)(x.send(bob))
    assert r.shape == (6, 4)
    assert torch.equal(r.get(), x.view(6, 4))


def test_build_leaves_state_untouched():
    w = torch.ones(2, requires_grad=True)

    @func2plan(args_shape=[(2,)], state=(w,))
    def step(x, state):
        (w,) = state.read()
        loss = (x * w).sum()
        loss.backward()
        with torch.no_grad():
            w -= 0.5 * w.grad
        w.grad = None
        return loss

    assert torch.equal(w, torch.ones(2)) and w.grad is None
    assert "fedws.set_grad" not in step.code and ".grad = None" in step.code


# -- checks and errors -----------------------------------------------------------------------


def test_forbidden_op_is_refused_by_the_node(make_worker):
    bob = make_worker("bob")
    plan = _double_abs()
    plan.build(torch.ones(2))
    plan._code.ops[1].name = "torch.save"  # what a hostile or newer peer could send
    pp = plan.send(bob)
    with pytest.raises(sy.OpNotAllowedError, match="torch.save"):
        pp.wait()
    r = pp(torch.ones(2).send(bob))
    with pytest.raises(sy.DependencyError, match="torch.save"):
        r.get()


def test_untraceable_op_fails_at_build():
    @func2plan()
    def leak(x):
        return (x + 1).share_memory_()

    with pytest.raises(sy.OpNotAllowedError):
        leak.build(torch.ones(2))


def test_error_inside_remote_plan_names_op_and_step(make_worker):
    bob = make_worker("bob")

    # Shapes that fail on the worker but not at trace: a (3,) input works, (2,) does not.
    bad_plan = func2plan()(lambda x: (x + 1).matmul(torch.ones(3, 3)))
    bad_plan.build(torch.ones(3))
    r = bad_plan.send(bob)(torch.ones(2).send(bob))
    with pytest.raises(sy.PlanError) as info:
        r.get()
    assert "Tensor.matmul" in str(info.value) and "step 3 of 3" in str(info.value)
    # A later command using the failed result fails with that error, chained.
    with pytest.raises(sy.DependencyError):
        (r + 1).get()


def test_plan_must_return_tensors():
    with pytest.raises(TypeError, match="must return"):
        func2plan(args_shape=[(1,)])(lambda x: 3)


def test_plan_code_roundtrips_the_codec():
    from fedws.protocol import codec
    from fedws.protocol.plan import PlanCode

    plan = Net()
    plan.build(torch.tensor([1.0, 2.0]))
    wire = codec.decode(codec.encode_bytes(plan._code.to_wire(plan.state_tensors)))
    code, state = PlanCode.from_wire(wire)
    assert [op.name for op in code.ops] == [op.name for op in plan._code.ops]
    assert all(torch.equal(a, b) for a, b in zip(state, plan.state_tensors))


# -- training --------------------------------------------------------------------------------


def test_training_step_with_state_trains_remotely(make_worker):
    torch.manual_seed(0)
    bob = make_worker("bob")
    x = torch.randn(64, 2)
    y = x @ torch.tensor([[2.0], [-3.0]]) + 1.0
    kept = x.tag("x").send(bob), y.tag("y").send(bob)  # noqa: F841 - keeps the data there
    w = torch.zeros(2, 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)

    @func2plan(args_shape=[(-1, 2), (-1, 1)], state=(w, b))
    def train_step(data, target, state):
        w, b = state.read()
        loss = ((data @ w + b - target) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            w -= 0.1 * w.grad
            b -= 0.1 * b.grad
        w.grad = None
        b.grad = None
        return loss

    step = train_step.send(bob)
    data, target = bob.search("x")[0], bob.search("y")[0]
    before = bob.session.messages_sent
    losses = [step(data, target) for _ in range(100)]
    losses[-1].wait()
    assert bob.session.messages_sent - before <= 100 + 2  # one per step (+ batched deletes)
    assert losses[0].get().item() > 5
    assert losses[-1].get().item() < 1e-3


def test_training_step_with_parameters_as_args(make_worker):
    torch.manual_seed(0)
    bob = make_worker("bob")
    x = torch.randn(32, 2)
    y = x @ torch.tensor([[1.0], [2.0]])

    @func2plan()
    def train_step(data, target, w, lr):
        loss = ((data @ w - target) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            new_w = w - lr * w.grad
        return loss, new_w.requires_grad_()

    w0 = torch.zeros(2, 1, requires_grad=True)
    train_step.build(x, y, w0, torch.tensor(0.1))
    step = train_step.send(bob)
    data, target, lr = x.send(bob), y.send(bob), torch.tensor(0.1).send(bob)
    w = w0.send(bob)
    for _ in range(60):
        loss, w = step(data, target, w, lr)
    assert loss.get().item() < 1e-2
    assert torch.allclose(w.get(), torch.tensor([[1.0], [2.0]]), atol=0.05)


# -- several workers -------------------------------------------------------------------------


async def test_plan_on_many_workers_concurrently(make_worker):
    workers = [make_worker(f"w{i}") for i in range(4)]
    plan = _double_abs()
    plan.build(torch.ones(2))
    pointer_plans = plan.send(*workers)
    assert isinstance(pointer_plans, MultiPointerPlan) and len(pointer_plans) == 4
    data = {w.id: torch.tensor([float(i), -1.0]).send(w) for i, w in enumerate(workers)}
    results = [pointer_plans[w](data[w.id]) for w in workers]  # all issued, nothing awaited
    values = await asyncio.gather(*(r.get_async() for r in results))
    assert [v.tolist() for v in values] == [[2.0 * i, 2.0] for i in range(4)]


def test_multi_pointer_plan_takes_multi_pointer(make_worker):
    bob, alice = make_worker("bob"), make_worker("alice")
    plan = _double_abs()
    plan.build(torch.ones(2))
    mpp = plan.send(bob, alice)
    x = torch.tensor([-1.0, 1.0]).send(bob, alice)
    out = mpp(x)
    assert isinstance(out, sy.MultiPointerTensor)
    assert [v.tolist() for v in out.get()] == [[2.0, 2.0], [2.0, 2.0]]


def test_state_class():
    s = State([torch.ones(1)])
    assert len(s.read()) == 1 and "State" in repr(s)
    with pytest.raises(TypeError):
        State([1])
