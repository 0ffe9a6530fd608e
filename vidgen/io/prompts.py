"""Prompt files, read one way for sample.py, eval.py and the before/after command.

A prompt file is plain text (one prompt per line) or JSONL, one object per line with the prompt under one of
`keys` (`{"prompt": ..., "seed": ..., "name": ...}`); blank lines are skipped. Every failure is one line naming
the file, the line and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vidgen.errors import UserError


class PromptFileError(UserError):
    """A prompt file that cannot be read; the message names the setting, the file and the line."""


def read_prompt_file(path: str | os.PathLike, setting: str = "prompts_file",
                     keys: Sequence[str] = ("prompt",)) -> list[dict[str, Any]]:
    """Items `{"prompt": str, ...other JSONL fields}` in file order, with their 0-based `"line_index"`."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{setting}={path}: no such file")
    items = []
    for i, line in enumerate(ln for ln in path.read_text().splitlines() if ln.strip()):
        if not line.lstrip().startswith("{"):
            items.append({"prompt": line.strip(), "line_index": i})
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{setting}={path}: line {i + 1} is not valid JSON ({e.msg})") from None
        text = next((item[k] for k in keys if isinstance(item.get(k), str)), None)
        if text is None:
            wanted = " (or ".join(f'"{k}"' for k in keys) + ")" * (len(keys) - 1)
            raise PromptFileError(f"{setting}={path}: line {i + 1} has no {wanted}")
        items.append({**item, "prompt": text, "line_index": i})
    if not items:
        raise PromptFileError(f"{setting}={path}: no prompts")
    return items
