"""The launcher's device guard (kernels/_common.py): kernels launch on the tensors' GPU, not the current one."""
from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from megagpt.kernels import _common


def test_launch_device_is_the_first_cuda_tensor_argument():
    with FakeTensorMode():  # tensors that claim a CUDA device without a GPU
        on_gpu1 = torch.empty(4, device="cuda:1")
    cpu = torch.zeros(2)
    assert _common.launch_device((cpu, 3, on_gpu1), {}) == torch.device("cuda", 1)
    assert _common.launch_device((cpu,), {"out": on_gpu1}) == torch.device("cuda", 1)
    assert _common.launch_device((cpu, 1.5), {}) is None


def test_launches_enter_the_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recording_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", recording_device)
    with FakeTensorMode():
        on_gpu1 = torch.empty(4, device="cuda:1")
    with _common.on_launch_device((on_gpu1, 7), {}):
        pass
    with _common.on_launch_device((torch.zeros(1),), {}):  # CPU (interpreter): no CUDA device touched
        pass
    assert entered == [torch.device("cuda", 1)]


def test_compiled_launch_runs_inside_the_device_guard(monkeypatch):
    # The GPU branch of TritonKernel's launch, with the compiled kernel replaced by a recorder.
    events = []

    @contextlib.contextmanager
    def recording_device(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    class FakeCompiled:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append(("launch", grid))

    monkeypatch.setattr(torch.cuda, "device", recording_device)
    monkeypatch.setattr(_common, "interpreter_active", lambda: False)
    kernel = _common.TritonKernel(lambda x_ptr: None)
    kernel._compiled = FakeCompiled()
    with FakeTensorMode():
        on_gpu1 = torch.empty(4, device="cuda:1")
    kernel[(3,)](on_gpu1)
    assert events == [("enter", torch.device("cuda", 1)), ("launch", (3,)), ("exit", torch.device("cuda", 1))]
