"""``NeuronDiversityMonitor``: log how diverse each layer's neurons are while a model trains.

Its scalars reach `trainer.callback_metrics` (through `LightningModule.log`, with `logger=False`),
so `EarlyStopping` and `ModelCheckpoint` can monitor them, and are written to every attached
logger directly, at the step and epoch Lightning gives its own values of the same hook (so they
are written on the monitor's own steps, whatever `log_every_n_steps` says). Histograms and figures
go to the logger experiments directly. It works with or without the `HypersphericalUniformity`
regulariser; with it (or the mixin) attached, each layer's angles follow its rule's space.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_hsu.functional._switches import check_switches
from lightning_hsu.functional.diversity import (
    DEFAULT_MAX_NEURONS,
    DIVERSITY_METRICS,
    DiversityMetric,
    DiversityProfile,
    diversity_profile,
)
from lightning_hsu.layers import (
    DEFAULT_LAYER_TYPES,
    LayerView,
    clean_module_name,
    is_depthwise,
    is_type,
    layer_views,
    storage_key,
    user_modules,
)
from lightning_hsu.lightning_adapter import attached_engines, overrides
from lightning_hsu.validation import choice, int_at_least, integer, number_in, optional_positive_int, positive_int

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_QUANTILES = (0.05, 0.5, 0.95)
#: With `figure_style="auto"`, more layers than this are drawn as one heatmap instead of one panel
#: each, which costs a tenth of the time for many layers (docs/performance.md).
MAX_FIGURE_PANELS = 12
FigureStyle = Literal["auto", "panels", "heatmap"]


def _is_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "_fsdp_wrapped_module") or hasattr(module, "_checkpoint_wrapped_module")


def _wandb_of(logger: Logger) -> Any:
    """The `wandb` module when `logger` is Lightning's `WandbLogger` (its histograms are native)."""
    if type(logger).__name__ != "WandbLogger":
        return None
    try:
        import wandb
    except ImportError:
        return None
    return wandb


def _matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _fsdp1_class() -> Any:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel


def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4
        from torch.distributed._tensor import DTensor
    return DTensor


def _fsdp1_owner(root: nn.Module, path: str, root_wrapper: nn.Module | None, fsdp1: type) -> nn.Module | None:
    """The FSDP1 unit whose flat parameter holds the weight at ``path``: the nearest wrapping unit,
    else the wrapper of the whole LightningModule (``trainer.strategy.model``)."""
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        candidate = root.get_submodule(".".join(parts[:depth]))
        if isinstance(candidate, fsdp1):
            return candidate
    return root_wrapper if isinstance(root_wrapper, fsdp1) else None


def _units(
    root: nn.Module, layers: Sequence[tuple[str, str]], root_wrapper: nn.Module | None
) -> list[tuple[nn.Module | None, list[tuple[str, str]]]]:
    """Group ``(name, path)`` layers by their FSDP1 unit (``None``: not FSDP1-sharded), in first-seen order."""
    fsdp1 = _fsdp1_class()
    groups: dict[int, tuple[nn.Module | None, list[tuple[str, str]]]] = {}
    for name, path in layers:
        owner = _fsdp1_owner(root, path, root_wrapper, fsdp1) if fsdp1 is not None else None
        groups.setdefault(id(owner), (owner, []))[1].append((name, path))
    return list(groups.values())


@contextlib.contextmanager
def _summoned(owner: nn.Module | None) -> Iterator[None]:
    """Full parameters of one FSDP1 unit, read-only (``writeback=False``), not of its children."""
    if owner is None:
        yield
        return
    fsdp1 = _fsdp1_class()
    assert fsdp1 is not None
    with fsdp1.summon_full_params(owner, writeback=False, recurse=False):
        yield


class NeuronDiversityMonitor(Callback):
    r"""Log per-layer neuron-diversity metrics to every logger, every N steps and/or at epoch end.

    For each selected layer the neurons (`neurons_of`) are scored
    by `diversity_profile`: minimum, mean
    nearest-neighbour and mean pairwise angle (degrees), coherence \(\max_{i\ne j}|c_{ij}|\),
    near-duplicates, hyperspherical energy (Liu et al., NeurIPS 2018), uniformity (Wang & Isola,
    ICML 2020), effective rank and condition number of the Gram matrix. What each logger gets:

    - `trainer.callback_metrics` (every rank) and every logger: the scalars
      ``hsu/diversity/<layer>/<metric>``, with the step and epoch Lightning gives its own values
      (``step`` = batches stepped so far, as in ``self.log``; at epoch end the step of Lightning's
      epoch-end row);
    - loggers with native histograms (TensorBoard ``add_histogram_raw``, W&B ``wandb.Histogram``):
      the histogram of the pairwise angles as ``hsu/diversity/<layer>/angles``;
    - loggers with figures (TensorBoard ``add_figure``, W&B ``log_image``, MLflow ``log_figure``):
      one figure of all layers' angle distributions as ``hsu/diversity/angle_distributions``, each
      layer's first profile beside the current one: one panel per layer up to 12 layers, above
      that one heatmap (a row per layer, colour = density), which draws in a tenth of the time
      (`figure_style` chooses);
    - loggers with neither (CSV): the angle quantiles ``hsu/diversity/<layer>/angle_p5``,
      ``angle_p50``, ``angle_p95`` in place of the histogram (``log_quantiles=True`` sends them
      everywhere).

    **At the start of training** (``on_train_start``, step 0 of a fresh run) the same is logged
    once for the initial weights, so every metric can be read as a change since initialisation
    (``log_at_train_start=False`` leaves it out).

    **Which space.** With ``half_space=None`` (default) a layer that an attached
    `HypersphericalUniformity` callback or mixin regularises is measured in its rule's space
    (half space for the presets' hidden layers: angles between lines), every other layer in full
    space; a message at the start of training lists the layers measured in half space, and the
    figure says which space each layer uses. ``True``/``False`` measure every layer in half/full space.

    **Huge layers.** A layer with more than `max_neurons` neurons (default 4,096) is profiled on
    that many of its neurons, drawn uniformly at random with `sample_seed` (the same neurons at
    every event, so its curves follow one subset): about the cost of a 4,096-neuron layer plus the
    exact spectrum (\(O(nd^2)\)) instead of \(O(n^2 d)\) (measurements in docs/performance.md). Such
    a layer also gets the scalar `hsu/diversity/<layer>/neurons_used`, and its figure label says `[m of n
    neurons]`. The mean angle, the energy and the histogram are then unbiased estimates, the
    uniformity and quantiles consistent ones, the minimum angle an upper bound, the coherence and
    duplicate count lower bounds, the nearest-neighbour angle an overestimate, the spectrum exact:
    see "Huge layers" in `lightning_hsu.functional.diversity`. `max_neurons=None` computes every
    layer exactly.

    **Tied weights** (one tensor in two modules, e.g. a language model's output layer sharing the
    input embedding) are profiled once, under the first module's name in `named_modules()` order;
    the figure labels that layer `first (= second)` and a message names both when first seen.

    Distributed: weights sharded by FSDP1 are gathered one FSDP unit at a time with
    ``summon_full_params(unit, writeback=False, recurse=False)``, FSDP2 ``DTensor`` weights with
    ``full_tensor()``; both on every rank (they are collectives). Metrics are computed and written
    on global rank 0 only. DeepSpeed ZeRO-3 partitioned weights are not gathered (not supported).

    Args:
        layers: glob patterns on layer names (as in ``named_modules()``, wrapper segments such as
            ``_fsdp_wrapped_module`` removed; the parts of a fused attention projection are
            ``<name>.q``/``.k``/``.v``, of ``nn.MultiheadAttention`` ``<name>.q_proj``/...), found
            and read as the rules find them (`lightning_hsu.layers`); ``None`` selects every layer
            of ``layer_types`` but depthwise convolutions. Each pattern must match a layer.
        exclude: glob patterns of module names to leave out; each must match a layer.
        layer_types: module classes, or globs on class names matched against the class and its
            bases (default: the rules' `DEFAULT_LAYER_TYPES` of `lightning_hsu.layers`, i.e.
            ``Linear``, ``Conv1-3d``, ``ConvTranspose1-3d``, Hugging Face ``Conv1D``,
            ``MultiheadAttention`` and their subclasses). Only layers with a 2+-D weight count.
        every_n_steps: log when ``global_step`` is a multiple of it (``None``: not during the epoch).
        log_at_epoch_end: also log at the end of every training epoch.
        metrics: a subset of `DIVERSITY_METRICS`
            (``None``: all). The energy, uniformity and spectrum each cost one more pass.
        half_space: ``True``: angles between lines, \(\min(\theta, 180^\circ - \theta)\), and
            half-space energy/uniformity, as for hidden layers in the papers, for every layer;
            ``False``: full space for every layer; ``None``: each layer as its rule regularises it
            (see "Which space" above).
        histogram_bins: bins of the angle histograms over \([0, 180]\) (\([0, 90]\)); fine enough
            (1° by default) for the figures to zoom onto a high-dimensional layer's narrow range.
        duplicate_threshold: nearest-neighbour angle (degrees) under which a neuron is a duplicate.
        log_histograms: send histograms to loggers that support them.
        log_figures: send the distribution figure to loggers that support figures (drawing and
            rendering cost about 0.08 CPU s per panel, and 0.3 s for a heatmap of 53 layers).
        figure_style: `"panels"` (one per layer), `"heatmap"` (one row per layer), or `"auto"`:
            panels up to 12 layers, a heatmap above.
        log_quantiles: ``None`` (default): quantiles only to loggers without histograms;
            ``True``: to every logger; ``False``: never.
        chunk_size: rows per block of the pairwise pass (``None``: automatic).
        prefix: first component of every key.
        log_at_train_start: log the initial weights' metrics at the start of training.
        max_neurons: layers with more neurons are profiled on a random subset of this many
            (`None`: every layer exactly); see "Huge layers" above.
        sample_seed: seed of those subsets.
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        layer_types: Sequence[str | type[nn.Module]] = DEFAULT_LAYER_TYPES,
        every_n_steps: int | None = None,
        log_at_epoch_end: bool = True,
        metrics: Sequence[DiversityMetric] | None = None,
        half_space: bool | None = None,
        histogram_bins: int = 180,
        duplicate_threshold: float = 1.0,
        log_histograms: bool = True,
        log_figures: bool = True,
        log_quantiles: bool | None = None,
        chunk_size: int | None = None,
        prefix: str = "hsu",
        max_neurons: int | None = DEFAULT_MAX_NEURONS,
        sample_seed: int = 0,
        figure_style: FigureStyle = "auto",
        log_at_train_start: bool = True,
    ) -> None:
        super().__init__()
        self.layers = None if layers is None else list(layers)
        self.exclude = list(exclude or [])
        self.layer_types = tuple(layer_types)
        self.every_n_steps = every_n_steps
        self.log_at_epoch_end = log_at_epoch_end
        self.metrics = None if metrics is None else list(metrics)
        self.half_space = half_space
        self.histogram_bins = histogram_bins
        self.duplicate_threshold = duplicate_threshold
        self.log_histograms = log_histograms
        self.log_figures = log_figures
        self.log_quantiles = log_quantiles
        self.chunk_size = chunk_size
        self.prefix = prefix
        self.max_neurons = max_neurons
        self.sample_seed = sample_seed
        self.figure_style = figure_style
        self.log_at_train_start = log_at_train_start
        self._check_options()
        self._selected: list[tuple[str, str]] = []  # (clean name, path in the wrapped module)
        self._last_step: int | None = None
        self._aliases: dict[str, list[str]] = {}  # first name of a tied weight -> the other names
        self._announced_ties: set[tuple[str, ...]] = set()
        self._figure: Figure | None = None
        #: The first profile of each layer (with its step): drawn beside the current one.
        self._initial: dict[str, tuple[int, DiversityProfile]] = {}
        self._draw_figures = log_figures
        self._half: dict[str, bool] = {}  # layer -> measured in half space
        self._scalars: dict[str, float] = {}  # the last event's scalars (for callback_metrics)

    # -- validation ---------------------------------------------------------------------------

    def _check_options(self) -> None:
        def fail(option: str, message: str) -> None:
            raise ValueError(f"NeuronDiversityMonitor: `{option}` {message}")

        owner = "NeuronDiversityMonitor"
        optional_positive_int(owner, "every_n_steps", self.every_n_steps)
        if self.every_n_steps is None and not self.log_at_epoch_end:
            fail("every_n_steps", "is None and `log_at_epoch_end` is False: the monitor would never log")
        if self.metrics is not None:
            unknown = [m for m in self.metrics if m not in DIVERSITY_METRICS]
            if unknown:
                fail("metrics", f"has unknown name(s) {unknown}; choose from {list(DIVERSITY_METRICS)}")
        positive_int(owner, "histogram_bins", self.histogram_bins)
        number_in(owner, "duplicate_threshold", self.duplicate_threshold, 0.0, 180.0)
        if not self.layer_types:
            fail("layer_types", "is empty: no layer could be selected")
        for t in self.layer_types:
            if not (isinstance(t, str) or (isinstance(t, type) and issubclass(t, nn.Module))):
                fail("layer_types", f"entries must be nn.Module classes or class-name globs, got {t!r}")
        for option, patterns in (("layers", self.layers or []), ("exclude", self.exclude)):
            for p in patterns:
                if not isinstance(p, str) or not p:
                    fail(option, f"entries must be non-empty glob strings, got {p!r}")
        if not isinstance(self.prefix, str) or not self.prefix:
            fail("prefix", f"must be a non-empty string, got {self.prefix!r}")
        optional_positive_int(owner, "chunk_size", self.chunk_size)
        if self.max_neurons is not None:  # None: every layer exactly
            int_at_least(owner, "max_neurons", self.max_neurons, 2)
        integer(owner, "sample_seed", self.sample_seed)
        choice(owner, "figure_style", self.figure_style, ("auto", "panels", "heatmap"))

    def _candidates(self, root: nn.Module, root_wrapper: nn.Module | None) -> dict[str, tuple[str, LayerView]]:
        """Name → (module path, view) of every set of neurons of a selected type, found as the
        rules find them (`layer_views`: Hugging Face ``Conv1D`` on its
        output axis, attention projections split into Q, K, V; depthwise convolutions only when
        named in ``layers``).

        Under FSDP1 a weight is a flat shard outside forward, so its shape is read inside its unit's
        ``summon_full_params`` (a collective: every rank runs this in the same order).
        """
        modules = dict(user_modules(root))
        typed: list[tuple[str, str]] = []
        seen: set[str] = set()
        for path, module in root.named_modules():
            if _is_wrapper(module) or not is_type(module, self.layer_types):
                continue
            name = clean_module_name(path)
            if name not in seen:
                seen.add(name)
                typed.append((name, path))
        out: dict[str, tuple[str, LayerView]] = {}
        for owner, members in _units(root, typed, root_wrapper):
            with _summoned(owner):
                for name, path in members:
                    module = root.get_submodule(path)
                    named = self.layers is not None and name in self.layers
                    if is_depthwise(module) and not named:
                        continue
                    for view in layer_views(name, module, modules):
                        shape = view.source_shape()
                        if shape is not None and len(shape) >= 2:
                            out[view.name] = (path, view)
        return out

    def _resolve(self, root: nn.Module, root_wrapper: nn.Module | None = None) -> list[tuple[str, str]]:
        candidates = self._candidates(root, root_wrapper)
        names = list(candidates)
        module_names = {view.module_name for _, view in candidates.values()}

        def matches(name: str, pattern: str) -> bool:  # a set of neurons, or the module holding it
            return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(candidates[name][1].module_name, pattern)

        for option, patterns in (("layers", self.layers or []), ("exclude", self.exclude)):
            for pattern in patterns:
                if not fnmatch.filter(names, pattern) and not fnmatch.filter(module_names, pattern):
                    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                    raise ValueError(
                        f"NeuronDiversityMonitor: `{option}` pattern {pattern!r} matches no layer of the selected "
                        f"types {list(map(str, self.layer_types))}; layers are: {shown or '(none)'}"
                    )
        selected = [
            name
            for name in names
            if (self.layers is None or any(matches(name, p) for p in self.layers))
            and not any(matches(name, p) for p in self.exclude)
        ]
        if not selected:
            raise ValueError(
                "NeuronDiversityMonitor: no layer selected (check `layers`, `exclude` and `layer_types`); "
                f"candidates were: {', '.join(names) or '(none)'}"
            )
        self._views = {name: candidates[name][1] for name in selected}
        return [(name, candidates[name][0]) for name in selected]

    # -- hooks --------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not trainer.loggers:
            raise ValueError(
                "NeuronDiversityMonitor: the Trainer has no logger (`logger=False`); attach one, e.g. CSVLogger"
            )
        self._check_options()
        check_switches()
        self._draw_figures = self.log_figures and _matplotlib_available()
        if self.log_figures and not self._draw_figures:
            # decided before training, not at the first logging event after the training time is spent
            rank_zero_warn(
                "NeuronDiversityMonitor: log_figures=True but matplotlib is not installed; the angle figures are "
                "left out (histograms and scalars are logged). Install `lightning-hsu[plots]` or pass "
                "log_figures=False to silence this."
            )
        # Layers built in `configure_model` do not exist yet: they are resolved in `on_fit_start`.
        if not overrides(pl_module, "configure_model"):
            self._selected = self._resolve(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the strategy wrapped the model (FSDP1 inserts wrapper modules): paths change.
        self._selected = self._resolve(pl_module, trainer.strategy.model)
        self._last_step = None
        self._initial = {}
        self._half = {}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every on_fit_start: the regulariser's engines are attached by now.
        self._half = self._spaces(pl_module)
        if self.half_space is None and any(self._half.values()):
            halves = [name for name, half in self._half.items() if half]
            rank_zero_info(
                "NeuronDiversityMonitor: measured in half space as their rules regularise them: "
                + ", ".join(halves)
                + "; every other layer in full space"
            )
        if self.log_at_train_start:
            self._log(trainer, pl_module, "start")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            self._log(trainer, pl_module, "batch")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.log_at_epoch_end:
            self._log(trainer, pl_module, "epoch")

    def _spaces(self, pl_module: pl.LightningModule) -> dict[str, bool]:
        """Whether each selected layer is measured in half space (see "Which space")."""
        if self.half_space is not None:
            return {name: bool(self.half_space) for name, _ in self._selected}
        ruled: dict[str, bool] = {}
        for engine in attached_engines(pl_module):
            for binding in engine.bindings:
                half = bool(binding.regularizer.hparams().get("half_space", False))
                ruled[binding.layer_name] = ruled.get(binding.layer_name, False) or half
        return {name: ruled.get(name, False) for name, _ in self._selected}

    def _half_space(self, name: str) -> bool:
        return self._half.get(name, bool(self.half_space))

    # -- work ---------------------------------------------------------------------------------

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: Literal["start", "batch", "epoch"]
    ) -> None:
        """Profile the layers (rank 0), share the scalars with every rank for `callback_metrics`, and
        write them, the histograms and the figure to the loggers (rank 0)."""
        if self._last_step is None or trainer.global_step != self._last_step:
            self._scalars = self._profile_and_write(trainer, pl_module, self._logger_step(trainer, hook))
            self._last_step = trainer.global_step
        # else: an epoch end right after a step event: same weights, already written at this step
        if hook == "start" or not self._scalars:
            return  # `self.log` is refused here (or at least not on a step row)
        for key, value in self._scalars.items():
            pl_module.log(key, value, on_step=hook == "batch", on_epoch=hook == "epoch", logger=False, batch_size=1)

    @staticmethod
    def _logger_step(trainer: pl.Trainer, hook: str) -> int:
        """The step Lightning gives the values that ``self.log`` writes from ``hook``: the batches
        stepped before this one in a batch hook, and the last batch's at epoch end (Lightning
        steps back by one to write its epoch-end row).

        Lightning keeps that count in a private attribute (its own `LearningRateMonitor` and
        `DeviceStatsMonitor` log at it too); without it, the global step."""
        stepped = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
        if not isinstance(stepped, int):
            stepped = trainer.global_step
        return max(0, stepped - 1) if hook == "epoch" else stepped

    def _profile_and_write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> dict[str, float]:
        if not self._half:
            self._half = self._spaces(pl_module)
        profiles: dict[str, DiversityProfile] = {}
        first_of: dict[Hashable, str] = {}
        aliases: dict[str, list[str]] = {}
        for name, neurons, key in self._gathered_neurons(trainer, pl_module):
            if key in first_of:  # a tied weight: profiled once, under its first name
                aliases.setdefault(first_of[key], []).append(name)
                continue
            first_of[key] = name
            if not trainer.is_global_zero:
                continue
            if not bool(torch.isfinite(neurons).all()):
                rank_zero_warn(f"NeuronDiversityMonitor: layer '{name}' has non-finite weights; its metrics are NaN")
                profiles[name] = self._nan_profile(int(neurons.shape[0]), self._half_space(name))
                continue
            profiles[name] = diversity_profile(
                neurons,
                metrics=self.metrics,
                half_space=self._half_space(name),
                duplicate_threshold=self.duplicate_threshold,
                quantiles=_QUANTILES,
                bins=self.histogram_bins,
                chunk_size=self.chunk_size,
                max_neurons=self.max_neurons,
                seed=self.sample_seed,
            )
        self._aliases = aliases
        for first, others in aliases.items():
            names = (first, *others)
            if names not in self._announced_ties:
                self._announced_ties.add(names)
                rank_zero_info(
                    f"NeuronDiversityMonitor: layers {', '.join(repr(n) for n in names)} share one weight; "
                    f"it is profiled once and logged as '{self.prefix}/diversity/{first}/...'"
                )
        scalars: dict[str, float] = {}
        if trainer.is_global_zero and profiles:
            scalars = self._scalars_of(profiles, with_quantiles=True)
            for name, profile in profiles.items():  # the first profile of a layer: "initial" in the figures
                self._initial.setdefault(name, (step, profile))
            self._figure = None  # drawn once per event, for every logger that takes it
            for logger in trainer.loggers:
                self._write(logger, profiles, step, trainer.current_epoch)
            self._figure = None
        # weight-derived numbers: computed once, the same on every rank (a collective on every rank)
        return cast("dict[str, float]", trainer.strategy.broadcast(scalars, src=0))

    def _key(self, name: str, metric: str) -> str:
        return f"{self.prefix}/diversity/{name}/{metric}"

    def _scalars_of(self, profiles: dict[str, DiversityProfile], *, with_quantiles: bool) -> dict[str, float]:
        scalars: dict[str, float] = {}
        for name, profile in profiles.items():
            for key, value in profile.metrics.items():
                if key.startswith("angle_p") and not with_quantiles:
                    continue
                scalars[self._key(name, key)] = float(value)
            if profile.sampled:
                scalars[self._key(name, "neurons_used")] = float(profile.neurons_used)
        return scalars

    def _nan_profile(self, n: int, half_space: bool) -> DiversityProfile:
        names = list(DIVERSITY_METRICS if self.metrics is None else self.metrics)
        names += [f"angle_p{100 * q:g}" for q in _QUANTILES]
        top = 90.0 if half_space else 180.0
        return DiversityProfile(
            metrics={n: math.nan for n in names},
            histogram=torch.zeros(self.histogram_bins, dtype=torch.int64),
            edges=torch.linspace(0.0, top, self.histogram_bins + 1),
            pairs=0,
            angle_sum=0.0,
            angle_sq_sum=0.0,
            min_angle=math.nan,
            max_angle=math.nan,
            neurons=n,
            neurons_used=n,
        )

    def _gathered_neurons(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> Iterator[tuple[str, Tensor, Hashable]]:
        """Yield ``(name, neurons, key)`` of every selected layer, running any gather on every rank.

        Every rank walks the same layers in the same order, so the collectives match. Ranks other
        than 0 receive gathered neurons too (and ignore them); where the weight is whole on every
        rank (single device, DDP) they receive nothing. Layers whose weight is one tensor (tied)
        get equal keys: the weight's storage (and the `Parameter` object), scoped to the FSDP unit,
        whose full parameters are freed when the next unit is summoned.
        """
        dtensor = _dtensor_class()
        for unit, (owner, members) in enumerate(_units(pl_module, self._selected, trainer.strategy.model)):
            # The consumer works on the neurons while the unit is summoned: no copy is needed.
            with _summoned(owner):
                for name, path in members:
                    view = replace(self._views[name], module=pl_module.get_submodule(path))
                    weight = view.source()
                    key = (unit, storage_key(weight), view.part, view.layout)
                    if dtensor is not None and isinstance(weight, dtensor):
                        yield name, view.neurons_from(cast(Any, weight).detach().full_tensor()), key
                    elif owner is not None or trainer.is_global_zero:
                        yield name, view.neurons_from(weight.detach()), key

    def _write(self, logger: Logger, profiles: dict[str, DiversityProfile], step: int, epoch: int) -> None:
        experiment = getattr(logger, "experiment", None)
        add_histogram_raw = getattr(experiment, "add_histogram_raw", None) if self.log_histograms else None
        wandb = _wandb_of(logger)
        takes_histograms = callable(getattr(experiment, "add_histogram_raw", None)) or wandb is not None
        with_quantiles = self.log_quantiles if self.log_quantiles is not None else not takes_histograms
        scalars: dict[str, float] = {"epoch": epoch}  # an int, as Lightning adds it to its own rows
        scalars.update(self._scalars_of(profiles, with_quantiles=with_quantiles))
        logger.log_metrics(scalars, step=step)
        if callable(add_histogram_raw):
            for name, profile in profiles.items():
                if profile.pairs == 0:
                    continue
                add_histogram_raw(
                    tag=self._key(name, "angles"),
                    min=profile.min_angle,
                    max=profile.max_angle,
                    num=profile.pairs,
                    sum=profile.angle_sum,
                    sum_squares=profile.angle_sq_sum,
                    bucket_limits=profile.edges[1:].tolist(),
                    bucket_counts=profile.histogram.tolist(),
                    global_step=step,
                )
        elif wandb is not None and self.log_histograms:
            histograms = {
                self._key(name, "angles"): wandb.Histogram(np_histogram=(p.histogram.tolist(), p.edges.tolist()))
                for name, p in profiles.items()
                if p.pairs > 0
            }
            logger.log_metrics(histograms, step=step)
        if self._draw_figures:
            self._write_figure(logger, experiment, profiles, step)

    def _write_figure(self, logger: Logger, experiment: Any, profiles: dict[str, DiversityProfile], step: int) -> None:
        add_figure = getattr(experiment, "add_figure", None)
        log_image = getattr(logger, "log_image", None)
        log_figure = getattr(experiment, "log_figure", None)  # MLflow's client
        run_id = getattr(logger, "run_id", None)
        if not callable(add_figure) and not callable(log_image) and not (callable(log_figure) and run_id):
            return
        from lightning_hsu.plotting import figure_to_rgb, plot_angle_distributions, plot_angle_heatmap

        spaces = {self._half_space(name) for name in profiles}
        space = "per layer" if len(spaces) > 1 else ("half space" if spaces == {True} else "full space")
        title = f"Pairwise angles ({space}), step {step}"
        labels = {name: self._label(name, profile) for name, profile in profiles.items()}
        style = self.figure_style
        if style == "auto":
            style = "heatmap" if len(profiles) > MAX_FIGURE_PANELS else "panels"
        fig = self._figure
        if fig is None:
            if style == "heatmap":
                histograms = {labels[n]: (p.histogram, p.edges) for n, p in profiles.items()}
                minima = {labels[n]: p.min_angle for n, p in profiles.items()}
                fig = plot_angle_heatmap(histograms, title=title, min_angles=minima)
            else:
                series: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}
                marks: dict[str, dict[str, float]] = {}
                for n, p in profiles.items():
                    first_step, first = self._initial.get(n, (step, p))
                    current = f"step {step}"
                    series[labels[n]] = {current: (p.histogram, p.edges)}
                    marks[labels[n]] = {current: p.min_angle}
                    if first_step != step:  # initial vs current, in one panel
                        initial = f"step {first_step} (first logged)"
                        series[labels[n]] = {initial: (first.histogram, first.edges), **series[labels[n]]}
                        marks[labels[n]][initial] = first.min_angle
                fig = plot_angle_distributions(series, title=title, min_angles=marks)
            self._figure = fig
        tag = f"{self.prefix}/diversity/angle_distributions"
        if callable(add_figure):
            add_figure(tag, fig, global_step=step, close=False)
        elif callable(log_image):
            log_image(key=tag, images=[figure_to_rgb(fig)], step=step)
        elif callable(log_figure):
            log_figure(run_id, fig, f"{tag}/step_{step:07d}.png")

    def _label(self, name: str, profile: DiversityProfile) -> str:
        """A layer's name in the figure: with the names tied to it, its space when the layers' spaces
        differ and, if sampled, how many neurons."""
        label = name
        if self._aliases.get(name):
            label += f" (= {', '.join(self._aliases[name])})"
        if profile.sampled:
            label += f" [{profile.neurons_used} of {profile.neurons} neurons]"
        if len({self._half_space(n) for n, _ in self._selected}) > 1:
            label += " (half space)" if self._half_space(name) else " (full space)"
        return label
