"""PySyft 0.2 tutorial "Part 08 - Introduction to Plans", cell by cell.

The cells are the tutorial's, with ``import fedws as sy``. The devices come from
``make_worker`` (VirtualWorkers or real nodes); on a real node the tutorial's
``VirtualWorker(hook, id=..., data=(x11, x12))`` becomes sending the same tagged tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fedws as sy


@pytest.fixture
def devices(hook: sy.TorchHook, transport: str, make_worker: Callable[..., sy.Worker]):
    x11 = torch.tensor([-1, 2.]).tag('input_data')
    x12 = torch.tensor([1, -2.]).tag('input_data2')
    x21 = torch.tensor([-1, 2.]).tag('input_data')
    x22 = torch.tensor([1, -2.]).tag('input_data2')
    if transport == "virtual":
        device_1 = sy.VirtualWorker(hook, id="device_1", data=(x11, x12))
        device_2 = sy.VirtualWorker(hook, id="device_2", data=(x21, x22))
        kept = []
    else:
        device_1, device_2 = make_worker("device_1"), make_worker("device_2")
        kept = [x11.send(device_1), x12.send(device_1), x21.send(device_2), x22.send(device_2)]
    yield device_1, device_2
    del kept


def test_part08_cells(hook: sy.TorchHook, devices) -> None:
    # IMPORTANT: Local worker should not be a client worker
    hook.local_worker.is_client_worker = False
    server = hook.local_worker
    assert server.id == "me"
    device_1, device_2 = devices

    # Basic example
    @sy.func2plan()
    def plan_double_abs(x):
        x = x + x
        x = torch.abs(x)
        return x

    assert repr(plan_double_abs).startswith("<Plan plan_double_abs id:")
    pointer_to_data = device_1.search('input_data')[0]
    assert pointer_to_data.tags == {"input_data"}
    assert plan_double_abs.is_built is False
    # This cell fails
    with pytest.raises(RuntimeError, match="not built"):
        plan_double_abs.send(device_1)
    plan_double_abs.build(torch.tensor([1., -2.]))
    assert plan_double_abs.is_built
    # This cell is executed successfully
    plan_double_abs.send(device_1)
    pointer_to_result = plan_double_abs(pointer_to_data)
    print(pointer_to_result)
    assert pointer_to_result.get().tolist() == [2., 4.]

    # Towards a concrete example
    class Net(sy.Plan):
        def __init__(self):
            super(Net, self).__init__()  # noqa: UP008  (as the tutorial writes it)
            self.fc1 = nn.Linear(2, 3)
            self.fc2 = nn.Linear(3, 2)

            self.add_to_state('fc1', 'fc2')

        def forward(self, x):
            x = F.relu(self.fc1(x))
            x = self.fc2(x)
            return F.log_softmax(x, dim=0)

    net = Net()
    assert len(net.state) == 4  # fc1 and fc2's weights and biases
    net.build(torch.tensor([1., 2.]))
    net.send(device_1)
    pointer_to_data = device_1.search('input_data')[0]
    pointer_to_result = net(pointer_to_data)
    expected = net(torch.tensor([-1, 2.]))  # the same plan, run locally
    assert torch.allclose(pointer_to_result.get(), expected)

    # Switch between workers
    class Net(sy.Plan):  # noqa: F811  (the tutorial redefines it)
        def __init__(self):
            super(Net, self).__init__()  # noqa: UP008  (as the tutorial writes it)
            self.fc1 = nn.Linear(2, 3)
            self.fc2 = nn.Linear(3, 2)

            self.state += ['fc1', 'fc2']

        def forward(self, x):
            x = F.relu(self.fc1(x))
            x = self.fc2(x)
            return F.log_softmax(x, dim=0)

    net = Net()

    # Build plan
    net.build(torch.tensor([1., 2.]))
    net.send(device_1)
    pointer_to_data = device_1.search('input_data')[0]
    pointer_to_result = net(pointer_to_data)
    on_device_1 = pointer_to_result.get()
    assert net.get() is net  # the model comes back
    net.send(device_2)
    pointer_to_data = device_2.search('input_data')[0]
    pointer_to_result = net(pointer_to_data)
    assert torch.allclose(pointer_to_result.get(), on_device_1)  # same data, same plan

    # Automatically building plans that are functions
    @sy.func2plan(args_shape=[(-1, 1)])
    def plan_double_abs(x):  # noqa: F811
        x = x + x
        x = torch.abs(x)
        return x

    assert plan_double_abs.is_built

    @sy.func2plan(args_shape=[(1, 2), (-1, 2)])
    def plan_sum_abs(x, y):
        s = x + y
        return torch.abs(s)

    assert plan_sum_abs.is_built

    @sy.func2plan(args_shape=[(1,)], state={"bias": torch.tensor([1])})
    def plan_abs(x, state):
        bias = state.read("bias")
        x = x.abs()
        return x + bias

    plan_abs.send(device_1)
    x_ptr = torch.tensor([-1, 0]).send(device_1)
    p = plan_abs(x_ptr)
    assert p.get().tolist() == [2, 1]
