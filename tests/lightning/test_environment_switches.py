"""A mistyped LIGHTNING_HSU_* variable stops `fit` in its set-up, before any training step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger
from models import TinyNet, trainer_kwargs

from lightning_hsu import HypersphericalUniformity, HypersphericalUniformityMixin, NeuronDiversityMonitor
from lightning_hsu.functional._switches import SWITCHES


class MixinNet(HypersphericalUniformityMixin, TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.configure_hyperspherical(rules=[{"regularizer": "mhe", "coefficient": 1.0}])


USES = {
    "callback": (lambda: [HypersphericalUniformity("mhe")], TinyNet),
    "mixin": (lambda: [], MixinNet),
    "monitor": (lambda: [NeuronDiversityMonitor(every_n_steps=1)], TinyNet),
}


@pytest.mark.parametrize("use", sorted(USES))
@pytest.mark.parametrize("switch", SWITCHES, ids=[s.name for s in SWITCHES])
def test_a_mistyped_switch_is_refused_before_the_first_step(tmp_path, monkeypatch, switch, use) -> None:
    callbacks, model = USES[use]
    steps: list[int] = []

    class Count(pl.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    monkeypatch.setenv(switch.name, "yes please")
    trainer = pl.Trainer(callbacks=[*callbacks(), Count()], **trainer_kwargs(tmp_path, logger=CSVLogger(tmp_path)))
    with pytest.raises(ValueError, match=f"{switch.name}='yes please': choose one of"):
        trainer.fit(model())
    assert steps == []
