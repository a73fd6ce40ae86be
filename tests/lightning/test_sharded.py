"""``shard_across_ranks``: each rank computes 1/W of the pairs, and training is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from models import TinyNet
from strategy_runs import TWO_PROCESSES, load_ranks, train

from lightning_hsu import MHE, HypersphericalUniformity, PenaltyEngine, Rule
from lightning_hsu.functional import hyperspherical_energy, neurons_of


class ShardRecordingMHE(MHE):
    """MHE that appends the share it computed (rank, world size, value) to a JSON-lines file."""

    def __init__(self, log_file: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.log_file = log_file

    def penalty(self, neurons, *, step=None):
        value = super().penalty(neurons, step=step)
        with open(self.log_file, "a") as handle:
            handle.write(json.dumps({"shard": self._shard, "step": step, "value": float(value)}) + "\n")
        return value


def test_engine_gives_sum_over_pairs_regularizers_their_share_only():
    engine = PenaltyEngine([Rule("mhe", layers=["hidden"]), Rule("mhs", layers=["fc"])])
    engine.bind(TinyNet(), shard=(1, 2))
    shards = {b.layer_name: b.regularizer._shard for b in engine.bindings}
    assert shards == {"hidden": (1, 2), "fc": None}


def test_shares_of_two_ranks_sum_to_the_full_penalty_and_gradient():
    layer = TinyNet().hidden
    full = hyperspherical_energy(neurons_of(layer), half_space=True)
    (full_grad,) = torch.autograd.grad(full, layer.weight)
    shares = [MHE(half_space=True) for _ in range(2)]
    total, grad = 0.0, torch.zeros_like(layer.weight)
    for rank, reg in enumerate(shares):
        reg.set_shard((rank, 2))
        value = reg(neurons_of(layer))
        grad += torch.autograd.grad(value, layer.weight)[0]
        total += float(value)
    assert total == pytest.approx(float(full), rel=1e-5)
    torch.testing.assert_close(grad, full_grad, rtol=1e-4, atol=1e-7)


def test_sharding_a_regularizer_that_is_no_sum_over_pairs_is_refused():
    from lightning_hsu import MGD

    with pytest.raises(ValueError, match="MGD cannot be shared across ranks"):
        MGD().set_shard((0, 2))


@pytest.mark.distributed
def test_sharded_ddp_training_equals_unsharded_and_each_rank_computes_half(tmp_path: Path):
    log_file = tmp_path / "shares.jsonl"
    rules = [
        Rule(ShardRecordingMHE(str(log_file), half_space=True), 1.0, target="hidden"),
        Rule("mhe", 10.0, target="classifier"),
    ]
    sharded = HypersphericalUniformity(rules=rules, shard_across_ranks=True)
    train("callback", tmp_path, strategy="ddp_spawn", callback=sharded, save_as="sharded-callback", **TWO_PROCESSES)
    whole = HypersphericalUniformity(rules=[Rule("mhe", 1.0, {"half_space": True}, target="hidden"), rules[1]])
    train("callback", tmp_path, strategy="ddp_spawn", callback=whole, save_as="whole-callback", **TWO_PROCESSES)
    (s0, s1), (w0, _) = load_ranks(tmp_path, "sharded", "callback"), load_ranks(tmp_path, "whole", "callback")
    for key in w0["weights"]:
        torch.testing.assert_close(s0["weights"][key], w0["weights"][key], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s0["weights"][key], s1["weights"][key], rtol=0, atol=0)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert {tuple(r["shard"]) for r in records} == {(0, 2), (1, 2)}
    # each rank computed its own share of both hidden layers at every step
    steps = {r["step"] for r in records}
    assert len(records) == 2 * 2 * len(steps)  # 2 hidden layers x 2 ranks per step
