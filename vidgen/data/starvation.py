"""When no sample survives: the one-line error that stops a loader instead of letting training spin on nothing.

A pass that yields no batch is an error, never an empty epoch: a non-resampled pass over this rank's shards, or
(resampled, an endless stream) `max_empty_draws` shard draws, or every shard drawn once, with no sample kept.
The message names the setting and shard folder, the drops by reason (with one example each) and what to change.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vidgen.data.shards import DataConfigError

_EXAMPLE_CHARS = 140


class DataStarvedError(DataConfigError):
    """No sample of a shard set survived decoding and filtering; the message is one line (see starved_message)."""


def clip_fixes(setting: str) -> dict[str, str]:
    """What to change per drop reason of clip shards, `setting` naming the shards (e.g. data.train_shards)."""
    remake = f"point {setting} at readable shards (re-make them with data_prep/make_shards.py)"
    return {
        "corrupt": remake, "tar_error": remake, "empty": f"point {setting} at shards that hold samples",
        "too_few_frames": "lower data.target_fps (or data.frame_stride) or add buckets with fewer frames to "
                          "data.buckets",
        "too_small": "raise data.max_upscale (null: any) or add smaller buckets to data.buckets",
        "no_bucket": "add a bucket of the samples' kind to data.buckets (1 frame for images, more for videos)",
        "no_caption": "set data.require_caption=false or caption the clips",
        "drop_last": "set data.drop_last=false or lower data.batch_size",
    }


def latent_fixes(setting: str) -> dict[str, str]:
    """What to change per drop reason of latent shards."""
    remake = f"point {setting} at readable latent shards (re-make them with data_prep/encode_latents.py)"
    return {**clip_fixes(setting), "corrupt": remake, "tar_error": remake}


@dataclass(frozen=True)
class StarveContext:
    """What a starved loader reports: the setting, the shard folder(s), the fix per drop reason, train or validation."""

    setting: str
    where: str
    fixes: Mapping[str, str] = field(default_factory=dict)
    role: str = "train"
    more_draws: str = "data.max_empty_draws"  # the setting that allows more empty resampled draws


def describe_shards(urls: Sequence[str]) -> str:
    """Shard paths -> their folder, or the first folders of several."""
    folders = sorted({os.path.dirname(os.path.abspath(u)) for u in urls})
    if len(folders) == 1:
        return folders[0]
    return f"{len(folders)} folders ({', '.join(folders[:2])}{', ...' if len(folders) > 2 else ''})"


def one_line(text: object, limit: int = _EXAMPLE_CHARS) -> str:
    """Any error text -> one short line (newlines folded, long text cut)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def starved_message(ctx: StarveContext, counts: Mapping[str, int], examples: Mapping[str, str], *, kept: int,
                    scope: str, all_tried: bool = True) -> str:
    """The one line: `SETTING=FOLDER: no sample survived SCOPE: DROPS; FIX` (`no batch formed in` with `kept`).

    counts: drops by reason (`tar_error` counts unreadable shards); examples: one "key: error" per reason;
    kept: samples that survived but made no batch (drop_last); all_tried: False when a resampled stream gave up
    before drawing every shard (the message then also names `ctx.more_draws`).
    """
    drops = {r: int(n) for r, n in counts.items() if n and r != "tar_error"}
    parts = []
    if drops:
        parts.append("dropped " + ", ".join(f"{r} {n}" + (f" (e.g. {examples[r]})" if r in examples else "")
                                            for r, n in sorted(drops.items(), key=lambda kv: -kv[1])))
    if counts.get("tar_error"):
        parts.append(f"unreadable shards {counts['tar_error']}"
                     + (f" (e.g. {examples['tar_error']})" if "tar_error" in examples else ""))
    if kept:
        what, top = f"{kept} sample(s) survived but none made a full batch", "drop_last"
    elif parts:
        what, top = ", ".join(parts), max(drops, key=drops.get) if drops else "tar_error"
    else:
        what, top = "the shards hold no samples", "empty"
    fix = ctx.fixes.get(top, f"check {ctx.setting} with data_prep/inspect_data.py")
    if not all_tried:
        fix += f" (or raise {ctx.more_draws} if most shards are expected to yield nothing)"
    return f"{ctx.setting}={ctx.where}: no {'batch formed in' if kept else 'sample survived'} {scope}: {what}; {fix}"
