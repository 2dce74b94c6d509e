"""Which ``blpo.yml`` entries are marked ``TUNED``: one reader of the marker for every test that needs it."""

from __future__ import annotations

import re

from sb3_blpo.zoo.configs import config_path

_TUNED = re.compile(r"^([\w-]+):  # TUNED", flags=re.MULTILINE)


def tuned_blpo_entries() -> list[str]:
    """The env ids whose ``blpo.yml`` entry is marked ``TUNED`` (its shape and solver settings come from a study)."""
    return _TUNED.findall(config_path("blpo").read_text())


def is_tuned_entry(env_id: str) -> bool:
    """Whether blpo.yml marks the env's entry ``TUNED`` (its shape comes from a study, not from the rules of thumb)."""
    return env_id in tuned_blpo_entries()
