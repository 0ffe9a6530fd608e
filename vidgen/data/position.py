"""The data position of a training run (epoch + batches consumed in it), saved in checkpoints for exact resume."""

from __future__ import annotations

import logging

from vidgen.data.pipeline import node_info

log = logging.getLogger(__name__)


class DataPositionMixin:
    """For LightningDataModules: counts consumed training batches, saves/restores them, skips them on resume.

    Lightning stores `state_dict()` in every checkpoint and calls `load_state_dict()` before building the
    train loader; the loader (a `ClipLoader`) then drops the batches of the saved epoch already trained on.
    The module must have `rank` / `world_size` hyperparameters (explicit overrides, or None) and call
    `apply_resume_position(loader)` on its train loader.
    """

    _position: dict | None = None
    _resume_position: dict | None = None

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world_size): explicit hyperparameters, else the Trainer's, else webdataset's detection."""
        hp = self.hparams
        if hp.rank is not None and hp.world_size is not None:
            return int(hp.rank), int(hp.world_size)
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return node_info(None, None)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Count the training batches consumed in the current epoch (Lightning's prefetched batch is not counted)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            if self._position is None or epoch != self._position["epoch"]:
                self._position = {"epoch": epoch, "consumed": 0}
            self._position["consumed"] += 1
        return batch

    def state_dict(self) -> dict:
        """The data position: epoch, batches consumed in it, and the world size they were split over."""
        return {**(self._position or {"epoch": 0, "consumed": 0}), "world_size": self._rank_world()[1]}

    def load_state_dict(self, state: dict) -> None:
        """Resume inside the saved epoch: the next train pass skips the batches already consumed.

        On another world size the shard split differs, so the position cannot carry over: the epoch
        restarts from its first batch (some samples of that epoch are seen twice), with a warning.
        """
        if "consumed" not in state:
            return
        world = self._rank_world()[1]
        consumed = int(state["consumed"])
        if int(state.get("world_size", world)) != world:
            log.warning("resuming on world_size=%d from a checkpoint of world_size=%s: the data position cannot carry "
                        "over, epoch %s restarts from its first batch", world, state.get("world_size"), state.get("epoch"))
            consumed = 0
        self._resume_position = {"epoch": int(state["epoch"]), "consumed": consumed}

    def apply_resume_position(self, loader) -> None:
        """Hand a restored position to a freshly built train loader (once)."""
        if self._resume_position is not None:
            self._position = dict(self._resume_position)
            loader.skip_batches(self._position["epoch"], self._position["consumed"])
            self._resume_position = None
