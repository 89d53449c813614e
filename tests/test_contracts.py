"""The entry models' contract is spelled once: in birdgen/contracts.py (and the configs made from it).

Why a test: a name typed twice drifts apart silently (the client asks for an output the server no
longer sends). Every module's string constants are scanned, docstrings excepted; the generated
config.pbtxt files are checked against the contract in tests/test_export.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

from birdgen import contracts
from tests.test_import_graph import modules

# Names distinctive enough that no other meaning can share them.
EVERYWHERE = {
    contracts.IMAGE_MODEL,
    contracts.ANIMATION_MODEL,
    contracts.ANIMATION_STREAM_MODEL,
    contracts.EINK_BUFFER,
    contracts.MANIFEST,
    contracts.PIPELINE_FILE,
    contracts.LORA_FILE,
    contracts.TARGET_FILE,
    contracts.MANIFEST_SIGNATURE,
    contracts.SIGNING_KEY,
    contracts.PUBLIC_KEY,
}
# Where the tensors cross Triton, so their plain-word names ("image", "request") must come from it.
WIRE = {
    "model_repository.bird_image",
    "model_repository.bird_animation",
    "model_repository.bird_animation_stream",
}
WIRE |= {"birdgen.client.calls", "birdgen.triton_config", "birdgen.ensemble.triton_model"}
TENSORS = {contracts.ENTRY_INPUT, contracts.PROGRESS, *contracts.IMAGE_OUTPUTS, *contracts.ANIMATION_OUTPUTS}


def string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def spelled_outside_contracts() -> dict[str, set[str]]:
    found = {}
    for module, path in modules().items():
        if module == "birdgen.contracts":
            continue
        names = EVERYWHERE | (TENSORS if module in WIRE else set())
        if hits := string_constants(path) & names:
            found[module] = hits
    return found


def test_entry_names_are_spelled_only_in_contracts() -> None:
    assert spelled_outside_contracts() == {}


def test_the_scan_sees_a_spelled_name(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text('"""bird_image in a docstring is fine."""\nMODEL = "bird_image"\nOTHER = f"{MODEL}/1"\n')
    assert string_constants(path) & EVERYWHERE == {"bird_image"}
