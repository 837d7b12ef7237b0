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


def test_states_name_their_classes_by_allow_listed_short_names():
    from dataclasses import dataclass

    from neatlm.nn.attention import AttentionState

    state = [AttentionState(torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4), 7), None]
    structure, tensors = flatten_state(state)
    assert structure["list"][0]["dataclass"] == "AttentionState"
    legacy = {"list": [{**structure["list"][0], "dataclass": "neatlm.nn.attention:AttentionState"}, {"value": None}]}
    for s in (structure, legacy):  # checkpoints before the allow-list named the module path
        back = unflatten_state(s, tensors)
        assert back[0].position == 7 and torch.equal(back[0].v, state[0].v) and back[1] is None

    @dataclass
    class Mine:
        x: int

    with pytest.raises(TypeError, match="not one of the state classes"):
        flatten_state([Mine(1)])


@pytest.mark.parametrize("structure, fragment", [
    ({"tensor": "nope"}, "tensor 'nope' is missing"),
    ({"dataclass": "AttentionState", "fields": {"k": {"value": 1}, "cmd": {"value": 2}}}, "expected ['k', 'v', 'position']"),
    ({"dataclass": "AttentionState", "fields": {"k": {"value": 1}}}, "missing"),
    ({"value": {"x": 1}}, "malformed value"),
    ({"list": [], "dict": {}}, "malformed state entry"),
    ("os:system", "malformed state entry"),
])
def test_malformed_states_are_checkpoint_errors(structure, fragment):
    from neatlm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="state.json: .*" + fragment.replace("[", r"\[").replace("]", r"\]")):
        unflatten_state(structure, {}, source="state.json")
