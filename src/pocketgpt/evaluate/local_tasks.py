"""lm-eval tasks from local files: WikiText-2 perplexities without the Hugging Face Hub.

lm-eval's ``wikitext`` task reads ``EleutherAI/wikitext_document_level`` from the Hub: one
document per article, scored with ``loglikelihood_rolling``, and reports

    word_perplexity = exp(-sum(loglikelihood) / sum(words)),  words = len(re.split(r"\\s+", page))
    byte_perplexity = exp(-sum(loglikelihood) / sum(bytes)),  bytes = len(page.encode())
    bits_per_byte   = -sum(loglikelihood) / sum(bytes) / ln 2

(words and bytes counted on the raw page). These tasks compute the same metrics on a local
WikiText raw file (by default the package's ``wikitext2_mini`` test split, the second half of
WikiText-2's test split), cut into articles at its ``" = Title = "`` headings:

* ``wikitext2_local``: the raw page is scored as it is, as pocketgpt models are trained;
* ``wikitext2_local_detok``: lm-eval's own ``wikitext`` detokenizer is applied first (its
  ``doc_to_target``), exactly as the Hub task does.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

from pocketgpt.errors import EvaluationError

LOCAL_TASKS = ("wikitext2_local", "wikitext2_local_detok")
_HEADING = re.compile(r"^ = [^=].* = $")  # an article's title line; " = = Section = = " is not


def default_file() -> Path:
    from pocketgpt.data import embedded_corpus_dir

    return embedded_corpus_dir() / "test.txt.gz"


def read_text(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise EvaluationError(f"local_file={path} cannot be read as UTF-8 text ({e})") from None


def documents(text: str) -> list[str]:
    """WikiText raw text -> its articles, each from its title line to the next title."""
    docs: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")) or not docs:
            docs.append([])
        docs[-1].append(line)
    return ["".join(d) for d in docs if "".join(d).strip()]


def _process_results(doc: dict[str, str], results: list[float]) -> dict[str, tuple[float, int]]:
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def _raw_page(doc: dict[str, str]) -> str:
    return doc["page"]


def task_config(name: str, path: str | Path | None = None) -> dict[str, Any]:
    """lm-eval's config dict of local task ``name`` over ``path`` (None: the package's file)."""
    if name not in LOCAL_TASKS:
        raise EvaluationError(
            f"{name!r} is not a local task; local tasks: {', '.join(LOCAL_TASKS)}"
        )
    path = Path(path) if path else default_file()
    if not path.is_file():
        raise EvaluationError(f"local_file={path} does not exist; give a WikiText raw text file")
    docs = documents(read_text(path))
    if not docs:
        raise EvaluationError(f"local_file={path} holds no text to evaluate")

    def dataset(**_: Any):  # lm-eval passes the task's metadata as keyword arguments
        import datasets

        return {"test": datasets.Dataset.from_dict({"page": docs})}

    if name == "wikitext2_local_detok":
        from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as target
    else:
        target = _raw_page
    return {
        "task": name,
        "custom_dataset": dataset,
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": target,
        "process_results": _process_results,
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in (
                ("word_perplexity", "weighted_perplexity"),
                ("byte_perplexity", "weighted_perplexity"),
                ("bits_per_byte", "bits_per_byte"),
            )
        ],
        "metadata": {"version": 1.0, "file": str(path)},
    }
