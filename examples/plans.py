"""The plans tutorial (PySyft 0.2, part 8) on fedws, as a runnable script.

A plan records a sequence of torch ops once; sent to a worker, each run costs one message
instead of one per op. Run: ``python examples/plans.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import fedws as sy
from fedws.plans import Plan, func2plan

hook = sy.TorchHook(torch)
server = hook.local_worker

# Devices hold some tagged data.
x11 = torch.tensor([-1, 2.0]).tag("input_data")
x12 = torch.tensor([1, -2.0]).tag("input_data2")
x21 = torch.tensor([-1, 2.0]).tag("input_data")
x22 = torch.tensor([1, -2.0]).tag("input_data2")
device_1 = sy.VirtualWorker(hook, id="device_1", data=(x11, x12))
device_2 = sy.VirtualWorker(hook, id="device_2", data=(x21, x22))
devices = device_1, device_2


# -- Basic example ---------------------------------------------------------------------------
@func2plan()
def plan_double_abs(x):
    x = x + x
    x = torch.abs(x)
    return x


print(repr(plan_double_abs))
pointer_to_data = device_1.search("input_data")[0]
print(pointer_to_data)
print("built?", plan_double_abs.is_built)
try:
    plan_double_abs.send(device_1)
except RuntimeError as error:
    print("sending an unbuilt plan:", error)

print("build ->", plan_double_abs.build(torch.tensor([1.0, -2.0])))
print("built?", plan_double_abs.is_built)
print(plan_double_abs.code)

pointer_plan = plan_double_abs.send(device_1)
print(pointer_plan)
pointer_to_result = pointer_plan(pointer_to_data)  # one message
print(pointer_to_result)
print(pointer_to_result.get())


# -- A network as a plan ---------------------------------------------------------------------
class Net(Plan):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


net = Net()
print(repr(net))
net.build(torch.tensor([1.0, 2.0]))
pointer_to_net = net.send(device_1)
print(pointer_to_net)
pointer_to_data = device_1.search("input_data")[0]
pointer_to_result = pointer_to_net(pointer_to_data)
print(pointer_to_result)
print(pointer_to_result.get())

# -- Switch between workers: same plan, no rebuild ------------------------------------------
pointer_to_net_2 = net.send(device_2)
pointer_to_data = device_2.search("input_data")[0]
print(pointer_to_net_2(pointer_to_data).get())


# -- Plans built at once from shapes, and state ----------------------------------------------
@func2plan(args_shape=[(-1, 1)])
def plan_double_abs_auto(x):
    x = x + x
    x = torch.abs(x)
    return x


print("built at once?", plan_double_abs_auto.is_built)


@func2plan(args_shape=[(1, 2), (-1, 2)])
def plan_sum_abs(x, y):
    s = x + y
    return torch.abs(s)


print("built at once?", plan_sum_abs.is_built)


@func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
def plan_abs(x, state):
    (bias,) = state.read()
    x = x.abs()
    return x + bias


pointer_plan = plan_abs.send(device_1)
x_ptr = torch.tensor([-1, 0]).send(device_1)
p = pointer_plan(x_ptr)
print(p.get())


# -- Beyond the tutorial: a training step is a plan (one message per step) -------------------
torch.manual_seed(0)
data = torch.randn(64, 2)
target = data @ torch.tensor([[2.0], [-3.0]]) + 1.0
w, b = torch.zeros(2, 1, requires_grad=True), torch.zeros(1, requires_grad=True)


@func2plan(args_shape=[(-1, 2), (-1, 1)], state=(w, b))
def train_step(x, y, state):
    w, b = state.read()
    loss = ((x @ w + b - y) ** 2).mean()
    loss.backward()
    with torch.no_grad():
        w -= 0.1 * w.grad
        b -= 0.1 * b.grad
    w.grad = None
    b.grad = None
    return loss


steps = train_step.send(device_1, device_2)  # a MultiPointerPlan: the same plan on both
batches = data.send(device_1, device_2), target.send(device_1, device_2)
for _ in range(50):
    losses = steps(*batches)  # one message per device, issued before anything is awaited
print("losses after 50 steps:", [f"{v.item():.2e}" for v in losses.get()])
