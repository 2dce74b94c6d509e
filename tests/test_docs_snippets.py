"""Every ```python block of README.md and docs/*.md runs, so that a snippet a user copies works as shown.

Snippets are executed as written, in a temporary folder, with one shim: ``OnPolicyAlgorithm.learn`` (PPO, A2C, BLPO)
trains for at most one rollout, ``n_steps × n_envs`` steps (the documented budgets are millions of steps), and
scripts that read ``sys.argv`` get the example arguments of their header comment. An undefined name, a wrong import or
a wrong argument fails the test. Mark a block that is not meant to run with ```text instead.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)
ARGV = re.compile(r"#\s*\S+\.py\s+—\s*python\s+(\S+\.py)((?:\s+\S+)*)")


def snippets() -> list[Any]:
    found = []
    for document in DOCUMENTS:
        for number, code in enumerate(SNIPPET.findall(document.read_text()), start=1):
            # A block inside a list item is indented like the item.
            found.append(pytest.param(document, textwrap.dedent(code), id=f"{document.relative_to(REPO)}#{number}"))
    return found


def _example_argv(code: str) -> list[str]:
    """``# name.py — python name.py SEED {a,b}`` → ``["name.py", "0", "b"]`` (the last choice: the richer path)."""
    match = ARGV.search(code)
    if match is None:
        return ["snippet.py"]
    argv = [match.group(1)]
    for word in match.group(2).split():
        argv.append(word.strip("{}").split(",")[-1] if word.startswith("{") else "0")
    return argv


@pytest.fixture
def one_rollout(monkeypatch: pytest.MonkeyPatch) -> None:
    original = OnPolicyAlgorithm.learn  # PPO, A2C and BLPO end up here through super().learn()

    def learn(self: Any, total_timesteps: int, *args: Any, **kwargs: Any) -> Any:
        rollout = int(getattr(self, "n_steps", 1)) * int(self.n_envs)
        return original(self, min(int(total_timesteps), rollout), *args, **kwargs)

    monkeypatch.setattr(OnPolicyAlgorithm, "learn", learn)


@pytest.mark.parametrize("document, code", snippets())
def test_snippet_runs(document: Path, code: str, one_rollout: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", _example_argv(code))
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(code, f"{document.relative_to(REPO)}", "exec"), namespace)


def test_every_document_is_scanned() -> None:
    assert len(snippets()) >= 10
