"""DataStatsCallback: logs the loader's drop counters (data/skipped_corrupt, data/tar_errors, data/dropped_<reason>)."""

from __future__ import annotations

import lightning.pytorch as pl


class DataStatsCallback(pl.Callback):
    """Logs the datamodule's running drop counts every train step (the logging rank's counts, no collective).

    No cross-rank reduction on purpose: in the non-resampled mode ranks may end their epochs at different
    steps, and an epoch-end collective would then pair with another rank's gradient all-reduce.
    The clip and latent data modules (vidgen.data.base.ShardDataModule) attach one themselves when they have a
    trainer (`log_stats=true`); listing it in the callbacks config as well is harmless (they attach one only
    when none is present).
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        metrics = dm.data_stats() if dm is not None and hasattr(dm, "data_stats") else {}
        for name, value in metrics.items():
            pl_module.log(name, float(value), on_step=True, on_epoch=False, batch_size=1)
