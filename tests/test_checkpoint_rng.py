"""Checkpoints carry every random generator a resumed run draws from: CPU, CUDA (all devices), Python."""

import random

import torch

from selfdistill.training import checkpoint


class FakeCuda:
    """Stands in for torch.cuda on a machine without a GPU: two devices with their own generator states."""

    def __init__(self, states):
        self.states = [s.clone() for s in states]

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for name in ("device_count", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self

    def device_count(self):
        return len(self.states)

    def get_rng_state_all(self):
        return [s.clone() for s in self.states]

    def set_rng_state_all(self, states):
        self.states = [s.clone() for s in states]


def test_rng_state_round_trip_includes_cuda(monkeypatch, tmp_path):
    saved_cuda = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    FakeCuda(saved_cuda).install(monkeypatch)
    torch.random.default_generator.manual_seed(7)
    random.seed(7)
    state = checkpoint.rng_state()
    checkpoint._tensor_file(tmp_path / "rng.pt", state)  # the file format checkpoints use
    expected = (torch.rand(3), random.random())

    torch.random.default_generator.manual_seed(99)
    random.seed(99)
    torch.cuda.set_rng_state_all([torch.zeros(3, dtype=torch.uint8)] * 2)  # the generators moved on
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))

    assert [s.tolist() for s in torch.cuda.get_rng_state_all()] == [[1, 2, 3], [4, 5, 6]]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_a_checkpoint_without_cuda_states_restores_cpu_and_python_only(monkeypatch):
    torch.manual_seed(3)
    state = checkpoint.rng_state()
    state["cuda_rng"] = []  # written on a machine without a GPU
    fake = FakeCuda([torch.tensor([9], dtype=torch.uint8)]).install(monkeypatch)
    checkpoint.set_rng_state(state)
    assert fake.states[0].tolist() == [9]  # left as it was
