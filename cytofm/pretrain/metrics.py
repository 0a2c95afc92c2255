"""Training metrics: TensorBoard scalars, a log line per logging step, collapse warnings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cytofm.pretrain.monitoring import collapse_signals, detect_collapse

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Write the scalars of logged steps to TensorBoard and the log, and warn on collapse.

    Only rank 0 writes (``enabled``); other ranks compute nothing here. TensorBoard events go
    to ``<output_dir>/tensorboard``.

    Args:
        output_dir: Run folder.
        enabled: False on ranks other than 0.
    """

    def __init__(self, output_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self.collapse_warnings = 0  # logged steps at which detect_collapse reported collapse
        self.history: list[dict[str, float]] = []  # scalars of every logged step, with "step"
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log_step(
        self,
        step: int,
        result: dict[str, Any],
        images_per_second: float,
    ) -> dict[str, float]:
        """Record the scalars of one step and warn when the teacher outputs show collapse.

        Args:
            step: Optimizer steps done.
            result: Output of ``PretrainTrainer.train_step`` run with ``monitor=True``.
            images_per_second: Throughput over the steps since the last logged one, all ranks.

        Returns:
            The scalars written (empty on ranks other than 0).
        """
        if not self.enabled:
            return {}
        values = result["schedule"]
        teacher = result["teacher"]
        signals = collapse_signals(result["teacher_probs"], teacher.cls_embeddings.float())
        scalars = {f"loss/{name}": value for name, value in result["losses"].items()}
        # The CLS term is a cross-entropy averaged over (teacher view, student view) pairs, so
        # it equals the teacher's mean entropy plus the mean KL divergence. The entropy part
        # rises while the centre settles and the temperature warms up; the KL part is what the
        # student reduces by learning. Rank 0's teacher entropy is used for all ranks.
        scalars["loss/cls_kl"] = result["losses"]["cls"] - signals["teacher_entropy"]
        scalars.update(
            {
                "schedule/lr": values.lr,
                "schedule/weight_decay": values.weight_decay,
                "schedule/teacher_momentum": values.teacher_momentum,
                "schedule/teacher_temp": values.teacher_temp,
                "schedule/teacher_patch_temp": values.teacher_patch_temp,
                "train/grad_norm": float(result["grad_norm"]),
                "train/images_per_second": images_per_second,
            }
        )
        scalars.update({f"collapse/{name}": float(value) for name, value in signals.items()})
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.history.append({"step": float(step), **scalars})

        logger.info(
            "step %d: loss %.4f (cls %.4f, patch %.4f), lr %.3g, wd %.3g, momentum %.5f, "
            "teacher temp %.4f, grad norm %.3g, %.2f images/s",
            step,
            result["losses"]["total"],
            result["losses"]["cls"],
            result["losses"]["patch"],
            values.lr,
            values.weight_decay,
            values.teacher_momentum,
            values.teacher_temp,
            scalars["train/grad_norm"],
            images_per_second,
        )
        reason = detect_collapse(signals)
        if reason:
            self.collapse_warnings += 1
            # The first detections are all logged; after that one in ten, so a run that stays
            # collapsed does not flood the log.
            if self.collapse_warnings <= 5 or self.collapse_warnings % 10 == 0:
                logger.warning("step %d (detection %d): %s", step, self.collapse_warnings, reason)
        return scalars

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
