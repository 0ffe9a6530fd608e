"""OmegaConf resolvers used by the configs, registered once by every entry point."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def register_resolvers() -> None:
    """Register `${vidgen.missing_env:NAME}` (True when the env var NAME is unset or empty)."""
    if not OmegaConf.has_resolver("vidgen.missing_env"):
        OmegaConf.register_new_resolver("vidgen.missing_env", lambda name: not os.environ.get(name))


register_resolvers()
