"""Build the embedded corpus ``src/pocketgpt/corpus/wikitext2_mini`` from raw WikiText-2.

The offline machines this project is developed on have only WikiText-2's validation and test
splits, so the mini corpus uses the validation split for training and cuts the test split in two
at the article boundary nearest its middle: the first half becomes validation, the second test.

    python scripts/build_wikitext2_mini.py --raw-dir ../shared/data/wikitext-2-raw
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "pocketgpt" / "corpus" / "wikitext2_mini"
# An article starts with a level-1 heading line such as " = Robert Boulter = ".
ARTICLE_HEADING = re.compile(r"^ = [^=].* = $")


def split_at_middle_article(text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    offsets, pos = [], 0
    for line in lines:
        if ARTICLE_HEADING.match(line.rstrip("\n")):
            offsets.append(pos)
        pos += len(line)
    middle = len(text) // 2
    cut = min(offsets[1:], key=lambda o: abs(o - middle))
    return text[:cut], text[cut:]


def write_gzip(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    # mtime=0 keeps the archive byte-for-byte reproducible.
    with (
        open(tmp, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f,
    ):
        f.write(text.encode("utf-8"))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-dir", type=Path, default=Path("../shared/data/wikitext-2-raw"))
    args = parser.parse_args()
    valid = (args.raw_dir / "wiki.valid.raw").read_text(encoding="utf-8")
    test = (args.raw_dir / "wiki.test.raw").read_text(encoding="utf-8")
    validation, test_half = split_at_middle_article(test)
    splits = {"train": valid, "validation": validation, "test": test_half}
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, text in splits.items():
        write_gzip(OUT / f"{name}.txt.gz", text)
        data = text.encode("utf-8")
        manifest[name] = {
            "file": f"{name}.txt.gz",
            "bytes": len(data),
            "lines": text.count("\n"),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        print(f"{name:<10} {len(data):>9,} bytes {text.count(chr(10)):>6,} lines")
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
