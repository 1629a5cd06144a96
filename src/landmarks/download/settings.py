"""The download stage's settings: config.yaml's `download:` section, checked, with CLI overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import aiohttp

from .. import __version__
from ..common import StageError

DEFAULT_USER_AGENT = (
    f"landmarks-pipeline/{__version__} (landmark recognition research; image dataset download; "
    f"aiohttp/{aiohttp.__version__})"
)


@dataclass(frozen=True)
class Settings:
    """The `download:` section of config.yaml (same names); CLI flags override it."""

    concurrency: int = 64
    per_host: int = 16
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    total_timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0
    max_retry_after_s: float = 300.0
    max_bytes: int = 50_000_000
    max_redirects: int = 5
    max_pixels: int = 100_000_000
    max_pixels_per_byte: float = 1000.0
    user_agent: str = DEFAULT_USER_AGENT
    threads: int = 2

    # Settings that only change speed; all others can change a row's outcome (see Journal).
    SPEED_ONLY = ("concurrency", "per_host", "threads")

    def outcome_settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.SPEED_ONLY}

    def check(self) -> None:
        for name in ("concurrency", "per_host", "threads", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise StageError(f"download setting {name} must be at least 1 (got {getattr(self, name)})")
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s", "max_pixels_per_byte"):
            if getattr(self, name) <= 0:
                raise StageError(f"download setting {name} must be positive (got {getattr(self, name)})")
        for name in ("retries", "backoff_s", "max_retry_after_s", "max_redirects"):
            if getattr(self, name) < 0:
                raise StageError(f"download setting {name} must not be negative (got {getattr(self, name)})")


def load_settings(settings_json: str | None, overrides: dict) -> Settings:
    """Defaults <- the JSON object of --settings (config.yaml's download section) <- CLI flags."""
    values = {}
    if settings_json:
        try:
            values = json.loads(settings_json)
        except ValueError as err:
            raise StageError(f"--settings is not a JSON object ({err})") from err
        if not isinstance(values, dict):
            raise StageError("--settings must be a JSON object of download settings")
        from ..config import section_settings

        section_settings("download", values, "--settings")  # types and ranges as config.yaml's; names the key
    # `mode` and `gldv2_*` belong to the same config section but steer the workflow, not this stage.
    values = {k: v for k, v in values.items() if k != "mode" and not k.startswith("gldv2_")}
    known = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StageError(f"unknown download setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
