"""The mixin however the module is composed, and both Lightning namespaces, each trained against
the MHE preset written by hand (``models.mhe_reference``)."""

from __future__ import annotations

import importlib

import lightning.pytorch as pl
import pytest
import torch
from models import TinyNet, assert_same_weights, mhe_reference, trainer_kwargs, weights
from torch import nn

from lightning_hsu import HypersphericalUniformity, HypersphericalUniformityMixin

PAPER_RULES = [
    {"regularizer": "mhe", "coefficient": 1.0, "options": {"half_space": True}, "target": "hidden"},
    {"regularizer": "mhe", "coefficient": 10.0, "target": "classifier"},
]


def reference_weights(tmp_path) -> dict[str, torch.Tensor]:
    ref = TinyNet(penalty=mhe_reference())
    pl.Trainer(**trainer_kwargs(tmp_path / "reference")).fit(ref)
    return weights(ref)


class MixinFirst(HypersphericalUniformityMixin, TinyNet):
    """The mixin before an existing module whose training_step it inherits."""

    def __init__(self) -> None:
        super().__init__()
        self.configure_hyperspherical(rules=PAPER_RULES)


class MixinLast(TinyNet, HypersphericalUniformityMixin):
    """The mixin after LightningModule in the MRO: its hooks are wrapped onto the class all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.configure_hyperspherical(rules=PAPER_RULES)


class DefinedFurtherDown(MixinFirst):
    """training_step defined in a subclass of the mixing class, not calling super."""

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class OwnHooks(MixinLast):
    """Its own on_fit_start and on_before_optimizer_step, neither calling super."""

    def on_fit_start(self) -> None:
        self.started = True

    def on_before_optimizer_step(self, optimizer) -> None:
        pass


@pytest.mark.parametrize("cls", [MixinFirst, MixinLast, DefinedFurtherDown, OwnHooks])
def test_mixin_trains_like_hand_written_however_composed(tmp_path, cls):
    model = cls()
    pl.Trainer(**trainer_kwargs(tmp_path / "mixin")).fit(model)
    assert_same_weights(weights(model), reference_weights(tmp_path))
    assert set(model.hyperspherical_engine.last_values) == {"conv/mhe", "hidden/mhe", "fc/mhe"}


def test_wrapped_hooks_keep_lightning_override_detection():
    from lightning.pytorch.utilities.model_helpers import is_overridden

    assert not is_overridden("on_before_optimizer_step", MixinFirst())
    assert is_overridden("on_before_optimizer_step", OwnHooks())


# -- both Lightning namespaces -------------------------------------------------------------------------
def _namespace_module(namespace: str):
    """TinyNet rebuilt on the namespace's LightningModule (the test models use lightning.pytorch)."""
    pkg = pytest.importorskip(namespace)

    class Net(pkg.LightningModule):
        training_step = TinyNet.training_step
        configure_optimizers = TinyNet.configure_optimizers
        train_dataloader = TinyNet.train_dataloader
        forward = TinyNet.forward

        def __init__(self, penalty=None) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.conv = nn.Conv2d(1, 4, 3)
            self.act = nn.ReLU(inplace=True)
            self.hidden = nn.Linear(4 * 4 * 4, 8)
            self.fc = nn.Linear(8, 5)
            self.lr = 0.1
            self.penalty = penalty

    class MixedNet(HypersphericalUniformityMixin, Net):
        def __init__(self) -> None:
            super().__init__()
            self.configure_hyperspherical(rules=PAPER_RULES)

    return pkg, Net, MixedNet


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
@pytest.mark.parametrize("way", ["callback", "mixin"])
def test_both_lightning_namespaces_train_like_hand_written(tmp_path, namespace, way):
    pkg, Net, MixedNet = _namespace_module(namespace)
    kw = trainer_kwargs(tmp_path)
    reference = Net(penalty=mhe_reference())
    pkg.Trainer(**kw).fit(reference)
    if way == "callback":
        model = Net()
        pkg.Trainer(callbacks=[HypersphericalUniformity(preset="mhe")], **kw).fit(model)
    else:
        model = MixedNet()
        pkg.Trainer(**kw).fit(model)
    assert_same_weights(weights(model), weights(reference))
    assert importlib.import_module(type(pkg.Trainer).__module__)  # the namespace really was used
