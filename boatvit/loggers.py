"""Where a training run's numbers go besides its own files: ``boatvit train --log tensorboard``.

The run directory always holds ``metrics.csv``, ``metrics.json`` and ``curves.png`` (`boatvit.runs`); a logger
writes the same numbers, and a few per optimizer step, where users of timm and Lightning already watch runs. Only
rank 0 logs (`boatvit.training.fit` opens the log there only).

TensorBoard (``RUN_DIR/tensorboard``, ``tensorboard --logdir runs``) gets, on one x axis, the optimizer step:

* ``step/loss``, ``step/lr``, ``step/images_per_s`` at every optimizer step: rank 0's mean loss over the step's
  micro-batches, the learning rate the step used (the top layers' under layer decay), and the images of all
  processes per second since the step before, as rank 0 timed them;
* ``epoch/<metric>`` for every number of the epoch's ``metrics.csv`` row (``train_loss``, ``lr``,
  ``train_images_per_s``, ``val_top1``, ``val_top5``, ...), at the step that ended the epoch;
* the run's ``config.json`` as text (``config``).

A resumed run appends to the same folder; its new event file starts with a purge at the step after its last saved
epoch, so the steps an interrupted epoch had logged, which the resumed run trains again, are not shown twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import UsageError
from .runtime import require_extra

__all__ = ['LOGGERS', 'check_logger', 'TensorBoardLog']

#: ``--log`` value -> (module to import, pip package); each is also the name of boatvit's extra that installs it
LOGGERS = {'tensorboard': ('tensorboard', 'tensorboard')}


def check_logger(name: Optional[str]) -> None:
    """A `UsageError` for a logger boatvit does not know, or whose package is not installed; None is no logger."""
    if name is None:
        return
    if name not in LOGGERS:
        raise UsageError(f'--log {name!r}: not a logger boatvit knows; the loggers are {", ".join(sorted(LOGGERS))}')
    module, package = LOGGERS[name]
    require_extra(module, package, f'--log {name}', extra=name)


class TensorBoardLog:
    """A run's TensorBoard event files in ``run_dir / 'tensorboard'`` (see the module docstring).

    Args:
        run_dir: the run directory.
        config: the run's ``config.json`` contents, written as text on a new run.
        resumed_at: the optimizer step of the last saved epoch of a resumed run; None for a new run.
    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed_at: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter  # imported here: it needs the optional tensorboard

        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / 'tensorboard'), purge_step=purge)
        if resumed_at is None:
            # a fenced block: TensorBoard renders text as Markdown
            self.writer.add_text('config', '```\n' + json.dumps(config, indent=2, default=str) + '\n```', 0)

    def step(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f'step/{name}', value, step)

    def epoch(self, step: int, row: Mapping[str, Any]) -> None:
        for name, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f'epoch/{name}', value, step)
        self.writer.flush()  # on disk with the epoch's checkpoint, not when the writer's timer fires

    def close(self) -> None:
        self.writer.close()
