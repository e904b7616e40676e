"""The package's shape: no import cycles, and the packaged configs compose from anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pocketgpt

PACKAGE = Path(pocketgpt.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: runs only as a script, never on import."""
    test = getattr(node, "test", None)
    return (
        isinstance(node, ast.If)
        and isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
    )


def import_graph() -> dict[str, set[str]]:
    """Module -> the pocketgpt modules it imports, at module level or inside functions."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        stack = list(ast.parse(path.read_text()).body)
        while stack:
            node = stack.pop()
            if _is_main_guard(node):
                continue
            stack.extend(ast.iter_child_nodes(node))
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                edges.update(subs or ([base] if base in files else []))
        graph[name] = edges - {name}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph[node]):
            assert target not in path, "import cycle: " + " -> ".join([*path, target])
            if target not in done:
                visit(target, [*path, target])
        done.add(node)

    for name in sorted(graph):
        visit(name, [name])


def test_library_modules_import_no_cli_or_tracking_from_the_model_side():
    """The model side (model, sampling, data, tokenizer) knows nothing of MLflow or Hydra."""
    graph = import_graph()
    for name in ("pocketgpt.model", "pocketgpt.sampling", "pocketgpt.data", "pocketgpt.config"):
        reachable, todo = set(), [name]
        while todo:
            for target in graph[todo.pop()] - reachable:
                reachable.add(target)
                todo.append(target)
        assert not {m for m in reachable if m.startswith(("pocketgpt.tracking", "pocketgpt.cli"))}


def test_configs_ship_inside_the_package():
    conf = PACKAGE / "conf"
    assert (conf / "train.yaml").is_file() and (conf / "generate.yaml").is_file()
    assert (conf / "experiment").is_dir() and not (conf / "experiment").is_symlink()
    assert sorted(p.stem for p in (conf / "experiment").glob("*.yaml")) == [
        "baseline",
        "fast",
        "lr_sweep",
        "model_size",
        "optuna_search",
        "tokenizer_ablation",
    ]
