"""torchmetrics feature metrics: values, bounded memory, partition independence, and 2-process DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_hsu.functional import hyperspherical_energy, uniformity
from lightning_hsu.functional.diversity import minimum_angle
from lightning_hsu.metrics import FeatureEnergy, FeatureMinimumAngle, FeatureUniformity

from .dist_worker import feature_data, make_metrics
from .geometry import icosahedron


def test_values_are_the_functional_core_over_all_rows() -> None:
    x = feature_data()
    for metric, expected in (
        (FeatureUniformity(t=2.0), uniformity(x, t=2.0)),
        (FeatureEnergy(power=1.0), hyperspherical_energy(x, power=1.0)),
        (FeatureMinimumAngle(), minimum_angle(x)),
    ):
        for batch in x.split(16):
            metric.update(batch)
        assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-5)


def test_known_answer_icosahedron_features() -> None:
    metric = FeatureMinimumAngle()
    metric.update(icosahedron().float()[:5])
    metric.update(icosahedron().float()[5:])
    assert metric.compute().item() == pytest.approx(63.4349, abs=1e-3)


def test_memory_is_bounded_and_the_sample_is_partition_independent() -> None:
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(1))
    one = FeatureUniformity(max_samples=32, seed=5)
    for batch in x.split(50):
        one.update(batch)
        assert one.sample().shape[0] <= 32
    assert one.sample().shape == (32, 8)
    # Another order and batch size, and two "ranks" merged by hand, keep the same rows.
    other = FeatureUniformity(max_samples=32, seed=5)
    for batch in x[torch.randperm(500, generator=torch.Generator().manual_seed(2))].split(7):
        other.update(batch)
    assert torch.equal(one.sample(), other.sample())
    halves = [FeatureUniformity(max_samples=32, seed=5) for _ in range(2)]
    halves[0].update(x[:123])
    halves[1].update(x[123:])
    merged = FeatureUniformity(max_samples=32, seed=5)
    merged.update(torch.cat([h.sample() for h in halves]))
    assert torch.equal(merged.sample(), one.sample())
    assert merged.compute().item() == one.compute().item()
    # The seed picks another sample, and reset empties the state.
    reseeded = FeatureUniformity(max_samples=32, seed=6)
    reseeded.update(x)
    assert not torch.equal(reseeded.sample(), one.sample())
    one.reset()
    assert one.sample().shape[0] == 0


def test_validation_and_too_few_rows() -> None:
    with pytest.raises(ValueError, match="max_samples"):
        FeatureUniformity(max_samples=1)
    with pytest.raises(ValueError, match=r"\[batch, d\]"):
        FeatureEnergy().update(torch.randn(2, 3, 4))
    metric = FeatureMinimumAngle()
    metric.update(torch.randn(4, 3))
    with pytest.raises(ValueError, match="dimension 5"):
        metric.update(torch.randn(4, 5))
    lonely = FeatureUniformity()
    lonely.update(torch.randn(1, 3))
    with pytest.warns(UserWarning, match="at least 2"):
        assert math.isnan(lonely.compute().item())


@pytest.mark.distributed
def test_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    from . import dist_worker

    torch.multiprocessing.spawn(
        dist_worker.worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # What one process computes over the same rows (rank 1 stopped after 40 of its 45 rows).
    x = feature_data()
    rows = torch.cat([x[0::2], x[1::2][:40]])
    single = make_metrics()
    for metric in single.values():
        metric.update(rows)
    for name, metric in single.items():
        expected = float(metric.compute())
        for r in range(2):
            assert results[r]["metrics"][name] == pytest.approx(expected, rel=1e-6, abs=1e-6), (name, r)

    for r in range(2):
        assert results[r]["fsdp1_names"] == ["0", "2"]  # wrapper segments removed from the names
        assert results[r]["fsdp1"] == {"0": True, "2": True}
        assert results[r]["fsdp2_sharded"] == "DTensor"
        assert results[r]["fsdp2"] == {"0": True, "2": True}
        assert results[r]["fsdp2_up"]
