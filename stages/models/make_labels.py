"""Build the packaged ImageNet-1k label file from the upstream Chinese and English names.

Run as ``python -m wanwu.stages.models.make_labels DATA_DIR OUT.json``, where
``DATA_DIR`` holds ``imagenet1k_zh.json``, ``imagenet1k_en.json`` and
``LICENSE-imagenet1k-labels.txt`` (see ``/work/shared/data/README.md``). Writes
``OUT.json`` (a list of ``{"class_id", "label", "label_en"}``, see
``LabelSet.from_json``) and copies the licence next to it.

The upstream Chinese names repeat four times because one class of each pair was
mistranslated; ``CORRECTIONS`` gives those classes their right names, and the
script refuses to write a file whose Chinese labels are not all distinct.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

from wanwu.errors import ModelError

logger = logging.getLogger(__name__)

NUM_CLASSES = 1000
LICENSE_NAME = "LICENSE-imagenet1k-labels.txt"

# class id -> corrected Chinese name; each comment gives the English class and
# the upstream name it collided with.
CORRECTIONS: dict[int, str] = {
    92: "食蜂鸟",  # bee eater, upstream 蜜蜂 (that is 309 bee)
    96: "巨嘴鸟",  # toucan, upstream 犀鸟 (that is 93 hornbill)
    438: "烧杯",  # beaker, upstream 高脚杯 (that is 572 goblet)
    802: "雪地摩托",  # snowmobile, upstream 雪橇 (that is 450 bobsled)
}


def build_labels(zh: dict[str, str], en: dict[str, str]) -> list[dict[str, object]]:
    """Merge the upstream name tables into label records, applying ``CORRECTIONS``.

    Args:
        zh: Chinese names keyed by class id as a string ("0" to "999").
        en: English synonyms ("tench, Tinca tinca") keyed likewise.

    Returns:
        ``NUM_CLASSES`` records ``{"class_id", "label", "label_en"}`` in class order.

    Raises:
        ModelError: a class is missing or the Chinese labels are not distinct.
    """
    records = []
    for class_id in range(NUM_CLASSES):
        key = str(class_id)
        if key not in zh or key not in en:
            raise ModelError(f"expected class {class_id} in both name tables, missing")
        # Upstream has stray whitespace (e.g. "啤酒杯 "), which would leak into records.
        label = CORRECTIONS.get(class_id, zh[key]).strip()
        records.append({"class_id": class_id, "label": label, "label_en": en[key].strip()})
    repeats = {name: n for name, n in Counter(r["label"] for r in records).items() if n > 1}
    if repeats:
        raise ModelError(f"expected distinct Chinese labels, got repeats {repeats}")
    return records


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="folder with imagenet1k_{zh,en}.json")
    parser.add_argument("out", type=Path, help="label file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def load(name: str) -> dict[str, str]:
        return json.loads((args.data_dir / name).read_text(encoding="utf-8"))

    records = build_labels(load("imagenet1k_zh.json"), load("imagenet1k_en.json"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # One record per line keeps diffs of later corrections readable.
    lines = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in records)
    args.out.write_text(f"[\n{lines}\n]\n", encoding="utf-8")
    shutil.copyfile(args.data_dir / LICENSE_NAME, args.out.parent / LICENSE_NAME)
    logger.info("wrote %d labels to %s", len(records), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
