"""PyTorch Lightning: a callback that attaches GradNorm to a LightningModule.

Lightning calls ``backward()`` itself; the session never does, so the module only has to hand its task
losses to ``self.gradnorm.loss`` and return the result::

    class Model(L.LightningModule):
        def training_step(self, batch, batch_idx):
            losses = {"depth": ..., "normals": ...}
            return self.gradnorm.loss(losses, epoch=self.current_epoch)

    trainer = L.Trainer(callbacks=[gradnorm.hooks.lightning.GradNormCallback(lambda m: m.trunk[-1], gradnorm.GradNorm(1.5), runs_root="runs")])

The run is closed as ``finished`` at the end of fitting and as ``failed`` when fitting raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union, cast

from gradnorm.toolkit import runs
from gradnorm.toolkit.balancers import Balancer

from .session import Session, attach

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("gradnorm.hooks.lightning needs the lightning package: pip install 'gradnorm-toolkit[lightning]'") from exc


class GradNormCallback(pl.Callback):
    """Creates ``pl_module.gradnorm`` (a :class:`hooks.Session`) when fitting starts.

    Args:
        shared_layer: a function of the LightningModule returning the shared layer W (module or parameter).
        balancer: GradNorm or any toolkit balancer.
        heads: ``"auto"`` (the default: the session finds the heads and taps the norms from Lightning's
            backward), a function of the module returning the task heads in task order, or None for the
            general path (see ``heads=`` of :func:`hooks.attach`).
        options: the other keyword arguments of :func:`hooks.attach` (``runs_root``, ``run_name``, ...).
    """

    def __init__(
        self,
        shared_layer: Callable[[pl.LightningModule], Any],
        balancer: Optional[Balancer] = None,
        *,
        heads: Union[None, bool, str, Callable[[pl.LightningModule], Sequence[Any]]] = "auto",
        runs_root: Optional[Union[str, Path]] = None,
        **options: Any,
    ) -> None:
        self.shared_layer = shared_layer
        self.balancer = balancer
        self.heads = heads
        self.runs_root = runs_root
        self.options = options
        self.session: Optional[Session] = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        options = dict(self.options)
        if self.heads is None or isinstance(self.heads, (str, bool)):
            options["heads"] = self.heads
        else:
            options["heads"] = list(self.heads(pl_module))
        self.session = attach(self.shared_layer(pl_module), self.balancer, runs_root=self.runs_root, **options)
        # nn.Module.__setattr__ is annotated for tensors and modules, though it keeps any other value as a plain attribute.
        cast(Any, pl_module).gradnorm = self.session

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:
            self.session.close(runs.FINISHED)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.session is not None:
            self.session.close(runs.INTERRUPTED if isinstance(exception, KeyboardInterrupt) else runs.FAILED)
