"""Label sets and the label files they come from.

Two file formats are read, chosen by extension:

* ``.json``: our format, a list of ``{"class_id", "label", "label_en"}``;
* anything else (``.txt``, ModelScope's ``meta_info.txt``): one label a line,
  either the label alone or ``index<TAB>label``; with indices they must run
  0, 1, 2, ... in order, because a line's position is its class id.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from wanwu.errors import ModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelSet:
    """Class names by class id, in Chinese with English alongside."""

    zh: tuple[str, ...]  # Chinese label of class i
    en: tuple[str, ...]  # English label of class i ("" where unknown)

    def __post_init__(self) -> None:
        if len(self.zh) != len(self.en):
            raise ModelError(f"expected as many English as Chinese labels, got {len(self.en)} and {len(self.zh)}")

    def __len__(self) -> int:
        return len(self.zh)

    @classmethod
    def from_json(cls, path: str | Path) -> "LabelSet":
        """Read a label file: a JSON list of ``{"class_id", "label", "label_en"}``."""
        try:
            items = json.loads(Path(path).read_text(encoding="utf-8"))
            items = sorted(items, key=lambda d: int(d["class_id"]))
            zh = tuple(str(d["label"]) for d in items)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ModelError(
                f"expected a JSON list of {{class_id, label, label_en}} in {path}: {type(exc).__name__}: {exc}"
            ) from exc
        if [int(d["class_id"]) for d in items] != list(range(len(items))):
            raise ModelError(f"expected class ids 0..{len(items) - 1} in {path}")
        return cls(zh, tuple(str(d.get("label_en", "")) for d in items))

    @classmethod
    def from_text(cls, path: str | Path) -> "LabelSet":
        """Read one label a line, optionally ``index<TAB>label`` (ModelScope's ``meta_info.txt``)."""
        try:
            lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"expected a UTF-8 label file at {path}: {exc}") from exc
        while lines and not lines[-1].strip():  # a trailing blank line is not a class
            lines.pop()
        labels = []
        for number, line in enumerate(lines):
            index, tab, label = line.partition("\t")
            if tab:
                if index.strip() != str(number):
                    raise ModelError(
                        f"expected index {number} on line {number + 1} of {path} (a line's position is "
                        f"its class id), got {index.strip()!r}"
                    )
                line = label
            if not line.strip():
                raise ModelError(f"expected a label on line {number + 1} of {path}, got an empty line")
            labels.append(line.strip())
        if not labels:
            raise ModelError(f"expected at least one label in {path}, got an empty file")
        return cls(tuple(labels), ("",) * len(labels))


def read_labels(path: str | Path) -> LabelSet:
    """The label set in ``path``: JSON by its ``.json`` extension, text otherwise.

    Raises:
        ModelError: the file is missing, unreadable or malformed (the message says where).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"expected a label file (.txt or .json) at {path}, found none")
    labels = LabelSet.from_json(path) if path.suffix.lower() == ".json" else LabelSet.from_text(path)
    logger.debug("read %d labels from %s", len(labels), path)
    return labels


def write_label_lines(labels: LabelSet, path: str | Path) -> None:
    """Write one Chinese label a line (Triton's ``label_filename`` format, line i = class i).

    Raises:
        ModelError: a label holds a line break, which would shift every later class.
    """
    bad = [i for i, label in enumerate(labels.zh) if "\n" in label or "\r" in label]
    if bad:
        raise ModelError(f"expected single-line labels, got line breaks in classes {bad[:5]}")
    Path(path).write_text("".join(f"{label}\n" for label in labels.zh), encoding="utf-8")
