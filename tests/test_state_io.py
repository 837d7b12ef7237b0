"""Model states of every mixer survive detach and a save/restore round trip."""

import pytest
import torch

from neatlm.config import Config
from neatlm.nn.model import NeatLM
from neatlm.train.state_io import detach_state, flatten_state, unflatten_state


@pytest.mark.parametrize("setup", ["attention", "memory", "bk"])
def test_state_round_trip_continues_exactly(setup):
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.window = 32, 2, 2, 6
    if setup == "memory":
        cfg.memory.enabled, cfg.memory.chunk_size = True, 4
    if setup == "bk":
        cfg.model.mixer = "bk"
    torch.manual_seed(0)
    model = NeatLM(cfg)
    x = torch.randint(0, 256, (2, 23))
    _, state, _, _ = model(x[:, :13])
    structure, tensors = flatten_state(detach_state(state))
    restored = unflatten_state(structure, {k: v.clone() for k, v in tensors.items()})
    a, _, _, _ = model(x[:, 13:], state)
    b, _, _, _ = model(x[:, 13:], restored)
    assert torch.equal(a, b)
    assert all(not t.requires_grad for t in flatten_state(detach_state(state))[1].values())
