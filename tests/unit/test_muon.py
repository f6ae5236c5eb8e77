"""muon=true: Muon on the draft's hidden matrices, the Trainer's AdamW on the rest, as one optimizer."""

import json
import shutil

import pytest
import torch
from tiny_targets import tiny_draft, tiny_target
from train_fixtures import save_prepared, save_tiny_target

from baldeagle.cli import parse_config
from baldeagle.config import ConfigError, TrainConfig
from baldeagle.model.checkpoint import load_draft
from baldeagle.train.objective import DraftObjective
from baldeagle.train.optim import ChainedOptimizer
from baldeagle.train.run import run_train
from baldeagle.train.trainer import EagleTrainer

MUON = dict(muon=True, learning_rate=2e-3, muon_lr_scale=1.5, muon_weight_decay=0.05, muon_momentum=0.9,
            weight_decay=0.01, adam_beta1=0.8, adam_beta2=0.99, adam_epsilon=1e-6)


def trainer_for(draft_type, tmp_path, **changes):
    draft, _ = tiny_draft(tiny_target("llama"), draft_type)
    args = TrainConfig(out=str(tmp_path / "out"), **{**MUON, **changes})
    return EagleTrainer(model=DraftObjective(draft), args=args, features=None)


def groups_by_name(trainer):
    """(names in Muon, names in the rest) of the chained optimizer."""
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    muon, rest = trainer.optimizer.optimizers
    return ([names[id(p)] for g in muon.param_groups for p in g["params"]],
            [names[id(p)] for g in rest.param_groups for p in g["params"]])


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_hidden_matrices_go_to_muon_and_the_rest_to_adamw(draft_type, tmp_path):
    trainer = trainer_for(draft_type, tmp_path)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, ChainedOptimizer)
    muon, rest = groups_by_name(trainer)
    assert isinstance(optimizer.optimizers[0], torch.optim.Muon)
    assert isinstance(optimizer.optimizers[1], torch.optim.AdamW)
    layer = "draft.midlayer." if draft_type == "eagle3" else "draft.layers.0."
    assert {"draft.fc.weight", layer + "self_attn.q_proj.weight", layer + "mlp.down_proj.weight"} <= set(muon)
    assert all(n.startswith(("draft.fc.", layer)) and n.endswith("weight") for n in muon), muon
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(muon) | set(rest) == trainable and not set(muon) & set(rest)  # each trainable param once
    assert not any("embed_tokens" in n for n in muon + rest)  # frozen
    assert ("draft.lm_head.weight" in rest) == (draft_type == "eagle3")  # eagle1's lm_head is frozen
    assert not any(n.endswith("bias") or "norm" in n for n in muon)
    if draft_type == "eagle1":
        assert "draft.fc.bias" in rest


@pytest.mark.parametrize("draft_type,ns_steps", [("eagle3", 5), ("eagle1", 5), ("eagle3", 2)])
def test_one_step_equals_bare_muon_and_adamw(draft_type, ns_steps, tmp_path):
    trainer = trainer_for(draft_type, tmp_path, muon_ns_steps=ns_steps)
    optimizer = trainer.create_optimizer()
    named = dict(trainer.model.named_parameters())
    muon_names, rest_names = groups_by_name(trainer)
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    torch.manual_seed(1)
    grads = {n: torch.randn_like(named[n]) for n in muon_names + rest_names}
    clones = {n: named[n].detach().clone().requires_grad_(True) for n in grads}
    before = {n: named[n].detach().clone() for n in grads}
    bare_muon = torch.optim.Muon([clones[n] for n in muon_names], lr=2e-3 * 1.5, weight_decay=0.05, momentum=0.9,
                                 nesterov=True, ns_steps=ns_steps, adjust_lr_fn="match_rms_adamw")
    bare_adamw = torch.optim.AdamW(
        [{"params": [clones[n] for n in rest_names if n in decay], "weight_decay": 0.01},
         {"params": [clones[n] for n in rest_names if n not in decay], "weight_decay": 0.0}],
        lr=2e-3, betas=(0.8, 0.99), eps=1e-6)
    for step in range(2):  # the second step uses the momentum / moments of the first
        for n, g in grads.items():
            named[n].grad, clones[n].grad = g * (step + 1), g.clone() * (step + 1)
        optimizer.step()
        bare_muon.step()
        bare_adamw.step()
    for n in grads:
        assert not torch.equal(named[n].detach(), before[n]), n  # every trainable parameter moved
        torch.testing.assert_close(named[n].detach(), clones[n].detach(), msg=n)


def test_the_scheduler_warms_up_both_groups_and_the_state_round_trips(tmp_path):
    trainer = trainer_for("eagle3", tmp_path, warmup_steps=4, lr_scheduler_type="linear")
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    muon, rest = optimizer.optimizers
    peaks = {"muon": 2e-3 * 1.5, "rest": 2e-3}
    for step in range(1, 5):
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
        for kind, opt in (("muon", muon), ("rest", rest)):
            for group in opt.param_groups:
                assert group["lr"] == pytest.approx(peaks[kind] * step / 4), (kind, step)
    saved = optimizer.state_dict()
    again = trainer_for("eagle3", tmp_path, warmup_steps=4, lr_scheduler_type="linear")
    again.create_optimizer_and_scheduler(num_training_steps=20)
    again.optimizer.load_state_dict(saved)
    assert [g["lr"] for g in again.optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    assert again.optimizer.param_groups[0] is again.optimizer.optimizers[0].param_groups[0]  # still the live groups
    state = again.optimizer.optimizers[0].state
    assert state and all("momentum_buffer" in s for s in state.values())
    with pytest.raises(ValueError, match="muon"):
        again.optimizer.load_state_dict(rest.state_dict())  # an AdamW-only checkpoint


def test_muon_keys_parse_from_the_cli_and_bad_values_name_the_key():
    _, cfg = parse_config(["train", "muon=true", "muon_lr_scale=2", "muon_ns_steps=3", "--muon-momentum", "0.9"])
    assert (cfg.muon, cfg.muon_lr_scale, cfg.muon_momentum, cfg.muon_weight_decay) == (True, 2.0, 0.9, 0.1)
    assert cfg.muon_ns_steps == 3 and TrainConfig().muon_ns_steps == 5
    assert TrainConfig().muon is False
    for argv, pattern in ((["muon_lr_scale=0"], r"^muon_lr_scale \(from .*\) must be above 0"),
                          (["muon_momentum=1"], r"^muon_momentum \(from .*\) must be below 1"),
                          (["--muon-weight-decay", "-1"], r"^muon_weight_decay \(from .*\) must be at least 0"),
                          (["muon_ns_steps=0"], r"^muon_ns_steps \(from .*\) must be at least 1"),
                          (["muon=maybe"], r"muon")):
        with pytest.raises(ConfigError, match=pattern):
            parse_config(["train", *argv])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("muon")
    return {"model": str(save_tiny_target(root / "target")), "data": str(save_prepared(root / "prepared")),
            "root": root}


def losses(out_dir) -> dict[int, float]:
    history = json.loads((out_dir / "final" / "metrics.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def final_weights(out_dir) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_draft(out_dir / "final").state_dict().items()}


@pytest.mark.parametrize("draft_type", ["eagle3", "eagle1"])
def test_resume_with_muon_gives_the_same_losses_and_weights(workspace, draft_type):
    """8 steps straight vs 4, stop, resume to 8: Muon's momentum and AdamW's moments come back."""
    out = workspace["root"] / f"muon-{draft_type}"

    def settings(**changes):
        return TrainConfig(model=workspace["model"], data=workspace["data"], out=str(out), draft_type=draft_type,
                           ttt_steps=2, draft_vocab_size=128, learning_rate=3e-3, warmup_steps=2, max_steps=8,
                           save_steps=4, per_device_train_batch_size=8, logging_steps=1, eval_fraction=0.0,
                           max_length=64, muon=True, **changes)

    run_train(settings())
    reference, reference_weights = losses(out), final_weights(out)
    assert reference[8] < reference[1]
    shutil.rmtree(out / "checkpoint-8")
    shutil.rmtree(out / "final")
    run_train(settings(resume=True))
    resumed, weights = losses(out), final_weights(out)
    for step in (5, 6, 7, 8):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, resumed, reference)
    for name, value in weights.items():
        torch.testing.assert_close(value, reference_weights[name], atol=1e-6, rtol=1e-5, msg=name)
