"""Transformer² adaptation: SVF experts, two-pass inference, coordinated test-time learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import small_config, write_corpus
from neatlm.adapt import files
from neatlm.adapt.base import open_base
from neatlm.adapt.domains import Domain
from neatlm.adapt.experts import document_nats, train_expert
from neatlm.adapt.session import evaluate_documents, make_classifier, make_expert, settings_of
from neatlm.adapt.svf import SVFBasis, attach_svf, detach_svf, get_z, lora_parameters, mix, set_z, svf_modules
from neatlm.adapt.test_time import learn_document
from neatlm.adapt.two_pass import cem
from neatlm.cli import main
from neatlm.config import AdaptConfig, Config
from neatlm.errors import NeatError
from neatlm.grad.checkpointing.policies import apply_checkpointing
from neatlm.nn.loss import lm_loss
from neatlm.nn.model import NeatLM
from neatlm.train.trainer import Trainer

PATTERNS = ("*.mlp.gate_up", "*.mlp.down")
FAST = ["adapt.steps=6", "adapt.batch_size=4", "adapt.seq_len=32", "adapt.prefix=48", "adapt.cem_population=4",
        "adapt.cem_generations=2", "adapt.ttl_chunk=32"]


def tiny_model(memory: bool = True, seed: int = 0) -> NeatLM:
    cfg = Config()
    cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, cfg.model.context, cfg.model.window = 32, 2, 2, 64, 16
    cfg.memory.enabled, cfg.memory.chunk_size = memory, 8
    torch.manual_seed(seed)
    return NeatLM(cfg)


def random_z(model: NeatLM, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: 1 + 0.3 * torch.randn(m.z.shape, generator=gen) for p, m in svf_modules(model).items()}


# ------------------------------------------------------------------------------------- SVF itself

def test_z_one_reproduces_the_base_model_exactly():
    model = tiny_model()
    x = torch.randint(0, 256, (2, 40))
    before = model(x).logits
    attach_svf(model, SVFBasis.of(model, PATTERNS))
    assert torch.equal(model(x).logits, before)                   # bit for bit, not to rounding
    detach_svf(model)
    assert torch.equal(model(x).logits, before)


def test_adapted_weight_is_the_rescaled_singular_value_product():
    model = tiny_model().double()
    basis = SVFBasis.of(model, PATTERNS)
    attach_svf(model, basis)
    z = random_z(model)
    set_z(model, {k: v.double() for k, v in z.items()})
    for path, (u, s, vh) in basis.factors.items():
        zz = z[path].double()
        expected = u @ torch.diag(s * zz) @ vh * (s.sum() / (s * zz).sum())
        torch.testing.assert_close(model.get_submodule(path).weight, expected, rtol=1e-10, atol=1e-12)


def test_only_z_trains_and_every_z_receives_a_gradient():
    model = tiny_model()
    attach_svf(model, SVFBasis.of(model, PATTERNS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("parametrizations.weight.0.z") for n in trainable)
    assert len(trainable) == 4                                    # 2 layers x (gate_up, down)
    x = torch.randint(0, 256, (2, 33))
    lm_loss(model(x[:, :-1]).logits, x[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name


def test_svf_runs_through_the_fused_checkpoint_path_with_the_same_gradients():
    model = tiny_model(memory=False)
    attach_svf(model, SVFBasis.of(model, PATTERNS))
    set_z(model, random_z(model))
    x = torch.randint(0, 256, (2, 33))

    def grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = lm_loss(model(x[:, :-1]).logits, x[:, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss0, g0 = grads()
    applied = apply_checkpointing(model, "selective")
    assert type(model.blocks[0]).__name__ == "FusedBlock" and applied
    loss1, g1 = grads()
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)


def test_z_gradient_matches_central_differences_in_float64():
    model = tiny_model(memory=False).double()
    attach_svf(model, SVFBasis.of(model, PATTERNS))
    set_z(model, {k: v.double() for k, v in random_z(model).items()})
    x = torch.randint(0, 256, (1, 17))
    path, module = next(iter(svf_modules(model).items()))

    def loss() -> torch.Tensor:
        return lm_loss(model(x[:, :-1]).logits, x[:, 1:])

    model.zero_grad()
    loss().backward()
    analytic = module.z.grad.clone()
    for i in range(0, module.z.numel(), 7):
        with torch.no_grad():
            module.z[i] += 1e-6
            up = loss()
            module.z[i] -= 2e-6
            down = loss()
            module.z[i] += 1e-6
        assert abs((up - down).item() / 2e-6 - analytic[i].item()) < 1e-6 * (1 + abs(analytic[i].item())), (path, i)


def test_svf_has_far_fewer_parameters_than_a_rank_4_lora():
    model = tiny_model()
    basis = SVFBasis.of(model, PATTERNS)
    svf = sum(basis.sizes().values())
    assert svf == sum(min(model.get_submodule(p).weight.shape) for p in basis.factors)
    assert lora_parameters(basis, 4) > 4 * svf


def test_mix_is_the_weighted_sum_of_experts():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])}
    assert torch.equal(mix([a, b], torch.tensor([0.25, 0.75]))["w"], torch.tensor([2.5, -0.25]))


def test_patterns_that_select_nothing_are_an_error():
    with pytest.raises(NeatError, match="selects no linear layer"):
        SVFBasis.of(tiny_model(), ("*.nothing",))


# ------------------------------------------------------------------------------------- CEM

def test_cem_finds_the_optimum_of_a_known_objective():
    target = torch.tensor([0.7, -1.2, 2.0], dtype=torch.float64)
    result = cem(lambda c: -((c - target) ** 2).sum(dim=1), torch.zeros(3), std=1.0, population=32,
                 generations=25, elite=0.25, seed=0)
    assert torch.allclose(result.best, target, atol=0.05)
    assert all(b >= a for a, b in zip(result.history, result.history[1:]))   # the best never gets worse
    assert result.history[-1] > result.history[0]


# ------------------------------------------------------------------------------------- a trained base run

@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    import neatlm.config

    root = tmp_path_factory.mktemp("adapt")
    corpus = write_corpus(root / "corpus")
    saved = neatlm.config.available_memory
    neatlm.config.available_memory = lambda: 64 * 10**9
    try:
        cfg = small_config(corpus, root / "run", steps=4)
        cfg.memory.enabled, cfg.memory.chunk_size, cfg.model.window = True, 8, 16
        torch.set_num_threads(1)
        Trainer(cfg).train()
    finally:
        neatlm.config.available_memory = saved
    domain = root / "prose"
    domain.mkdir()
    for i in range(6):
        (domain / f"doc{i}.txt").write_text(f"Chapter {i}. The quick brown fox jumps over the lazy dog. " * 30)
    return root


def test_an_expert_trains_only_z_and_round_trips_through_its_file(base_run, one_thread):
    settings = settings_of(FAST)
    adapted = open_base(base_run / "run", PATTERNS)
    base = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if not n.endswith(".z")}
    result = make_expert(adapted, Domain("prose", str(base_run / "prose"), ".txt", 0.3), "prose", settings)
    for n, p in adapted.model.named_parameters():
        if not n.endswith(".z"):
            assert torch.equal(p, base[n]), n                     # the base never moves
    assert any(not torch.equal(v, torch.ones_like(v)) for v in result.z.values())
    again = open_base(base_run / "run", PATTERNS)                 # the basis is read back, not recomputed
    loaded = again.load_expert("prose")
    assert loaded.keys() == result.z.keys() and all(torch.equal(loaded[k], result.z[k]) for k in loaded)


def test_an_expert_of_another_base_model_is_refused(base_run, tmp_path, one_thread):
    adapted = open_base(base_run / "run", PATTERNS)
    ones = adapted.ones()
    files.write(files.expert_file(base_run / "run", "foreign"), ones,
                {"kind": "svf-expert", "base": "0123456789abcdef", "name": "foreign"})
    with pytest.raises(NeatError, match="made for base model 0123456789abcdef"):
        adapted.load_expert("foreign")
    files.expert_file(base_run / "run", "foreign").unlink()
    broken = files.expert_file(base_run / "run", "broken")
    broken.write_bytes(b"\x00" * 40)
    with pytest.raises(NeatError, match="not a readable adaptation file"):
        adapted.load_expert("broken")
    broken.unlink()


def test_coordinated_test_time_learning_is_causal(base_run, one_thread):
    settings = settings_of(FAST)
    adapted = open_base(base_run / "run", PATTERNS)
    doc = bytearray(b"def alpha(beta):\n    return beta + 1\n" * 5)
    first = learn_document(adapted, bytes(doc), adapted.ones(), settings)
    cut = 100                                                     # inside the fourth 32-byte chunk
    doc[cut] = (doc[cut] + 7) % 256
    second = learn_document(adapted, bytes(doc), adapted.ones(), settings)
    # loss i predicts byte i + 1 from bytes <= i: the losses before the change are equal
    torch.testing.assert_close(second.nats[:cut - 1], first.nats[:cut - 1], rtol=0, atol=1e-6)
    assert not torch.allclose(second.nats[cut - 1:], first.nats[cut - 1:])
    assert any(not torch.equal(v, torch.ones_like(v)) for v in first.z.values())   # z learned
    base = {n: p for n, p in adapted.model.named_parameters()}
    assert all(not p.requires_grad for n, p in base.items() if not n.endswith(".z"))  # frozen again after


def test_test_time_learning_from_z_one_starts_exactly_as_the_base_model(base_run, one_thread):
    settings = settings_of(FAST)
    adapted = open_base(base_run / "run", PATTERNS)
    doc = b"def gamma(delta):\n    return delta + 2\n" * 3
    learned = learn_document(adapted, doc, adapted.ones(), settings)
    nats, count = document_nats(adapted, doc[:33], adapted.ones(), start=1)
    # the first chunk is scored before any step: its losses are the base model's
    assert math.isclose(float(learned.nats[:32].double().sum()), nats, rel_tol=1e-5)
    assert count == 32


def test_two_pass_methods_run_end_to_end(base_run, one_thread):
    settings = settings_of(FAST)
    adapted = open_base(base_run / "run", PATTERNS)
    make_expert(adapted, Domain("prose", str(base_run / "prose"), ".txt", 0.3), "prose", settings)
    make_expert(adapted, Domain("code", str(base_run / "corpus"), ".py", 0.2), "code", settings)
    classifier = make_classifier(adapted, settings)
    assert classifier.experts == ["code", "prose"]
    docs = Domain("prose", str(base_run / "prose"), ".txt", 0.3).documents(2, 300, settings.prefix + 2)
    results = {m: evaluate_documents(adapted, docs, m, settings, expert="prose" if m == "expert" else None)
               for m in ("base", "expert", "cem", "classifier", "ttl")}
    assert all(math.isfinite(v) and v > 0 for v in results.values()), results


# ------------------------------------------------------------------------------------- the CLI

def test_cli_adapt_and_eval(base_run, capsys, one_thread):
    run = str(base_run / "run")
    sets = [a for s in FAST for a in ("--set", s)]
    assert main(["adapt", "--run", run, "--data", str(base_run / "prose"), "--extensions", ".txt",
                 "--val-fraction", "0.3", "--name", "prose2", "--quiet", *sets]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["expert"] == "prose2" and out["steps"] == 6
    assert (base_run / "run" / "adapt" / "experts" / "prose2.safetensors").is_file()
    assert main(["eval", "--run", run, "--adapt", "expert", "--expert", "prose2", "--data", str(base_run / "prose"),
                 "--extensions", ".txt", "--val-fraction", "0.3", "--docs", "1", "--doc-bytes", "200", *sets]) == 0
    assert json.loads(capsys.readouterr().out)["bpb"] > 0
    assert main(["generate", "--run", run, "--adapt", "expert", "--expert", "prose2", "--prompt", "The ",
                 "--max-bytes", "5", *sets]) == 0


@pytest.mark.parametrize("argv, message", [
    (["adapt", "--run", "{root}/nope", "--data", "{root}/prose", "--name", "x"], "no such run"),
    (["adapt", "--run", "{root}/run", "--data", "{root}/missing", "--name", "x"], "no such file or directory"),
    (["adapt", "--run", "{root}/run", "--data", "{root}/empty", "--name", "x"], "no files ending in .py"),
    (["adapt", "--run", "{root}/run", "--data", "{root}/prose", "--name", "../x"], "an expert name is"),
    (["adapt", "--run", "{root}/run", "--data", "{root}/prose", "--name", "x", "--set", "model.dim=8"], "adapt.* keys"),
    (["adapt", "--run", "{root}/run", "--data", "{root}/prose", "--name", "x", "--set", "adapt.steps=0"],
     "adapt.steps = 0"),
    (["adapt", "--run", "{root}/run"], "give --data PATH and --name NAME"),
    (["eval", "--run", "{root}/run", "--adapt", "expert", "--expert", "nobody"], "no expert 'nobody'"),
    (["eval", "--run", "{root}/run", "--adapt", "expert", "--expert", "../../x"], "an expert name is"),
    (["eval", "--run", "{root}/run", "--adapt", "expert"], "needs --expert"),
    (["eval", "--run", "{root}/run", "--expert", "prose"], "goes with --adapt"),
    (["generate", "--run", "{root}/run", "--adapt", "ttl"], "invalid choice"),
])
def test_cli_bad_adaptation_input_is_one_line_and_exit_2(base_run, capsys, argv, message):
    (base_run / "empty").mkdir(exist_ok=True)
    code = main([a.format(root=base_run) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_an_adapt_config_section_exists_and_is_checked():
    assert AdaptConfig().patterns == "*.mlp.gate_up,*.mlp.down"
    with pytest.raises(NeatError, match="adapt.cem_elite"):
        settings_of(["adapt.cem_elite=0"])


def test_train_expert_reports_held_out_bits_per_byte(base_run, one_thread):
    settings = AdaptConfig(steps=4, batch_size=4, seq_len=32, lr=1e-2)
    adapted = open_base(base_run / "run", PATTERNS)
    corpus = Domain("prose", str(base_run / "prose"), ".txt", 0.3).corpus()
    result = train_expert(adapted, corpus, settings)
    assert math.isfinite(result.val_bpb_before) and math.isfinite(result.val_bpb_after)
    assert get_z(adapted.model).keys() == result.z.keys()


def test_cli_refuses_an_expert_made_for_another_base_model(base_run, capsys, one_thread):
    adapted = open_base(base_run / "run", PATTERNS)
    files.write(files.expert_file(base_run / "run", "alien"), adapted.ones(),
                {"kind": "svf-expert", "base": "fedcba9876543210", "name": "alien"})
    try:
        code = main(["eval", "--run", str(base_run / "run"), "--adapt", "expert", "--expert", "alien"])
        err = capsys.readouterr().err
        assert code == 2 and "made for base model fedcba9876543210" in err and len(err.strip().splitlines()) == 1
    finally:
        files.expert_file(base_run / "run", "alien").unlink()


def test_a_classifier_file_without_its_experts_is_refused(base_run, capsys, one_thread):
    adapted = open_base(base_run / "run", PATTERNS)
    path = files.classifier_file(base_run / "run")
    saved = path.read_bytes() if path.is_file() else None
    try:
        files.write(path, {**{f"z.{k}": v for k, v in adapted.ones().items()}, "head.weight": torch.zeros(2, 32),
                           "head.bias": torch.zeros(2)}, {"kind": "svf-classifier", "base": adapted.fingerprint})
        code = main(["eval", "--run", str(base_run / "run"), "--adapt", "classifier"])
        err = capsys.readouterr().err
        assert code == 2 and "not a classifier of this run" in err and len(err.strip().splitlines()) == 1
    finally:
        if saved is not None:
            path.write_bytes(saved)
        else:
            path.unlink()
