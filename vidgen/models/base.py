"""What every vidgen model records about itself: its constructor arguments (`self.config`).

File formats live in `vidgen.io.pretrained` (`save_pretrained(model, dir)` / `load_pretrained(dir)`); a model
only says what it is made of, so that the folder rebuilds it: `type(model)(**model.config)`.
"""

from __future__ import annotations

import inspect
from typing import Any


def capture_config(cls: type, frame_locals: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of `cls` taken from `locals()` inside its `__init__`."""
    params = inspect.signature(cls.__init__).parameters
    return {k: frame_locals[k] for k in params if k != "self" and k in frame_locals}


class Configurable:
    """Mixin of models that set `self.config` (their constructor arguments) in `__init__`.

    `export_extra()` adds keys to an export's config.json (e.g. the VAE's latent statistics); `after_load(meta)`
    restores them when the folder is read back.
    """

    config: dict[str, Any]

    def export_extra(self) -> dict[str, Any]:
        """Extra config.json keys of an export of this model."""
        return {}

    def after_load(self, meta: dict[str, Any]) -> None:
        """Restore extra keys of `config.json` (the inverse of `export_extra`)."""
