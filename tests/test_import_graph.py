"""The import graph points one way: core <- engines <- ensemble / export <- client, training, bench, CLI.

Why a test: the direction is what lets a reader (and the torch-free client) know which modules a
change can reach. Every import counts, function-level ones included, and no module may reach itself
through others (a loop means neither can be read or changed alone). See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AREAS = {  # import prefix -> folder (pyproject's package-dir)
    "birdgen": "birdgen",
    "birdgen.engines": "birdgen/engines",
    "birdgen.export": "export",
    "birdgen.ensemble": "ensemble",
    "birdgen.client": "client",
    "birdgen.training": "training",
    "birdgen.benchmarks": "benchmarks",
    "birdgen.gateway": "gateway",
    "birdgen.qa": "qa",
}
CORE = {
    "birdgen",
    "birdgen.contracts",
    "birdgen.prompts",
    "birdgen.prompt_tokenizer",
    "birdgen.catalogue",
    "birdgen.schema",
    "birdgen.request_error",
    "birdgen.eink_panels",
    "birdgen.eink",
    "birdgen.input_image",
    "birdgen.control",
    "birdgen.control_templates",
    "birdgen.free_noise",
    "birdgen.manifest",
    "birdgen.media",
    "birdgen.model_folder",
    "birdgen.stages",
    "birdgen.process_group",
    "birdgen.server",
    "birdgen.signing",
    "birdgen.tiny_model",
    "birdgen.qa_config",
    "birdgen.triton_config",
    "birdgen.triton_install",
}
# Rank of each part: a module may import its own part or a lower rank (ensemble and export are peers).
RANKS = {"core": 0, "engines": 1, "ensemble": 2, "export": 2, "top": 3}


def part(module: str) -> str:
    if module in CORE:
        return "core"
    for area in ("engines", "ensemble", "export"):
        if module.startswith(f"birdgen.{area}"):
            return area
    return "top"  # client, training, benchmarks, cli, entrypoint, pregenerate, the entry model.py files


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in AREAS.items():
        for path in (ROOT / folder).glob("*.py"):
            found[prefix if path.stem == "__init__" else f"{prefix}.{path.stem}"] = path
    for path in (ROOT / "model_repository").glob("*/model.py"):
        found[f"model_repository.{path.parent.name}"] = path
    return found


def imports(found: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the birdgen modules it imports anywhere in its file (relative imports resolved)."""

    def known(name: str) -> str | None:
        while name and name not in found:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in found.items():
        package = module if path.stem == "__init__" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets |= {known(f"{base}.{alias.name}") or known(base) for alias in node.names}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def against_direction(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if RANKS[part(b)] > RANKS[part(a)] or (part(a) != part(b) and RANKS[part(a)] == RANKS[part(b)])
    }


def test_the_walk_sees_function_level_and_package_imports() -> None:
    graph = imports(modules())
    assert "birdgen.triton_config" in graph["birdgen.engines.tensorrt_profiles"]  # inside a function
    assert "birdgen.client.aio" in graph["birdgen.client"]  # a package's __init__
    assert graph["model_repository.stage"] == {"birdgen.ensemble.triton_model"}


def test_imports_point_one_way() -> None:
    against = sorted(against_direction(imports(modules())))
    assert not against, f"imports against core <- engines <- ensemble/export <- the rest: {against}"


def test_the_check_fails_on_an_upward_import() -> None:
    graph = {"birdgen.schema": {"birdgen.client.calls"}, "birdgen.export.lora": {"birdgen.ensemble.routing"}}
    assert against_direction(graph) == {
        ("birdgen.schema", "birdgen.client.calls"),
        ("birdgen.export.lora", "birdgen.ensemble.routing"),
    }


def test_the_client_is_torch_free_core_only() -> None:
    graph = imports(modules())
    client = {m for m in graph if m.startswith("birdgen.client")}
    reached = {t for m in client for t in graph[m] if not t.startswith("birdgen.client")}
    assert reached <= CORE, sorted(reached - CORE)


def test_the_gateway_reaches_only_the_core_and_the_client() -> None:
    """The gateway image installs no torch: it may import the torch-free core and the client only."""
    graph = imports(modules())
    gateway = {m for m in graph if m.startswith("birdgen.gateway")}
    reached = {
        t for m in gateway for t in graph[m] if not t.startswith(("birdgen.gateway", "birdgen.client"))
    }
    assert reached <= CORE, sorted(reached - CORE)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's import loops: every strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycles() -> None:
    """A loop (even through a function-level import) means neither module can be read or changed alone."""
    assert cycles(imports(modules())) == []


def test_the_check_finds_a_loop_through_three_modules() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
