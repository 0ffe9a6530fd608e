"""The data position of a training run (epoch, batches and sample keys consumed in it), saved in checkpoints for an
exact resume on the same or another world size."""

from __future__ import annotations

import logging

import torch.distributed as dist

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
        """(rank, world_size) of the data split: explicit hyperparameters, else the Trainer's, else webdataset's
        detection. Under sequence parallelism (the training module's `sequence_parallel` = P ranks per group) a
        group is one data-parallel rank: (rank // P, world_size // P), so its ranks read the same batches."""
        hp = self.hparams
        if hp.rank is not None and hp.world_size is not None:
            return int(hp.rank), int(hp.world_size)
        if self.trainer is not None:
            group = getattr(self.trainer.lightning_module, "sequence_parallel", 1)
            return self.trainer.global_rank // group, self.trainer.world_size // group
        return node_info(None, None)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Count the training batches consumed in the current epoch and record their sample keys (Lightning's
        prefetched batch is not counted)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            epoch = trainer.current_epoch
            if self._position is None or epoch != self._position["epoch"]:
                self._position = {"epoch": epoch, "consumed": 0, "keys": []}
            self._position["consumed"] += 1
            self._position["keys"].extend(batch.get("key", []) if isinstance(batch, dict) else [])
        return batch

    def state_dict(self) -> dict:
        """The data position: epoch, batches consumed in it, the world size they were split over, and the keys of
        every sample consumed in the epoch by any rank (gathered: each rank calls this when a checkpoint is saved).

        The keys make a resume on another world size exact: those samples are left out of the rest of the epoch
        (`load_state_dict`). They are the epoch's keys only (a few bytes per sample, reset every epoch).
        """
        position = self._position or {"epoch": 0, "consumed": 0, "keys": []}
        keys = set(position.get("keys", [])) | set(position.get("inherited", []))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, sorted(keys))
            keys = set().union(*every)
        return {"epoch": position["epoch"], "consumed": position["consumed"], "world_size": self._rank_world()[1],
                "keys": sorted(keys), "by_keys": bool(position.get("by_keys"))}

    def load_state_dict(self, state: dict) -> None:
        """Resume inside the saved epoch, so that no sample it already trained on comes again in that epoch.

        Same world size: the next train pass skips the batches already consumed (bit-exact with an uninterrupted run).
        Another world size (shards split differently): the samples whose keys the checkpoint lists are left out
        of the rest of that epoch, whichever rank now reads them (keys must be unique in the shards, as
        make_shards writes them). Resampled data (independent draws with replacement) has no such partition: there
        the epoch's batch count restarts, with a warning.
        """
        if "consumed" not in state:
            return
        world = self._rank_world()[1]
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        same_world = int(state.get("world_size", world)) == world
        if same_world and not state.get("by_keys"):
            self._resume_position = {"epoch": epoch, "consumed": consumed}
        elif "keys" in state and not getattr(self.hparams, "resampled", False):
            self._resume_position = {"epoch": epoch, "consumed": 0, "skip_keys": list(state["keys"])}
            log.info("resuming epoch %d on world_size=%d from a checkpoint of world_size=%s: %d sample(s) it already "
                     "trained on are left out of the rest of the epoch", epoch, world, state.get("world_size"),
                     len(state["keys"]))
        else:
            log.warning("resuming on world_size=%d from a checkpoint of world_size=%s: the data position cannot carry "
                        "over (%s), epoch %s restarts from its first batch", world, state.get("world_size"),
                        "resampled data" if "keys" in state else "the checkpoint lists no sample keys", epoch)
            self._resume_position = {"epoch": epoch, "consumed": 0}

    def apply_resume_position(self, loader) -> None:
        """Hand a restored position to a freshly built train loader (once)."""
        if self._resume_position is not None:
            position = self._resume_position
            skip_keys = position.pop("skip_keys", None)
            self._position = {**position, "keys": []}
            if skip_keys is not None:  # another world size: leave those samples out, count from here
                loader.skip_keys(position["epoch"], set(skip_keys))
                self._position.update(inherited=skip_keys, by_keys=True)
            else:
                loader.skip_batches(position["epoch"], position["consumed"])
            self._resume_position = None
