"""Settings addon: loads ``config.toml``, reloads it on SIGHUP (seed 002).

A file that fails to parse or validate keeps the running config and logs why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from mitmproxy import ctx, exceptions

from .core.config import Config, ConfigError, parse_config

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.toml"


def read_config(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        return parse_config(text, os.environ)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


class Settings:
    def __init__(self) -> None:
        self.config: Config | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "billing_config", str, os.environ.get("LLM_BILLING_CONFIG", str(DEFAULT_CONFIG)),
            "Path of the billing proxy's config.toml (env: LLM_BILLING_CONFIG).",
        )

    def configure(self, updated: set[str]) -> None:
        if "billing_config" in updated:
            try:
                self._install(read_config(Path(ctx.options.billing_config)))
            except ConfigError as e:
                raise exceptions.OptionsError(str(e)) from None

    def running(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    def done(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    def reload(self) -> None:
        path = Path(ctx.options.billing_config)
        try:
            self._install(read_config(path))
        except ConfigError as e:
            logger.error(f"Config reload failed, keeping the previous config: {e}")
            return
        assert self.config is not None
        logger.info(f"Reloaded {path}: {len(self.config.backends)} backends")

    def _install(self, config: Config) -> None:
        for warning in config.warnings:
            logger.warning(warning)
        self.config = config
