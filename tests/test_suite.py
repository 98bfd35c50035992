"""Rules of the test suite itself, read from its source: test modules share code through
helpers.py (fixtures through conftest.py), never by importing one another; and an
``async def`` never calls a blocking wait, which would stop the app under test on its
event loop (conftest.py also fails a test that sleeps there, as it happens)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent

BLOCKING = {"wait_for": "await wait_until()", "stop_config_services": "await stop_services()",
            "time.sleep": "await asyncio.sleep()", "subprocess.run": "asyncio.to_thread(subprocess.run, ...)",
            "urllib.request.urlopen": "asyncio.to_thread()"}


def sources() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(TESTS.glob("*.py")):
        yield path.name, ast.parse(path.read_text(), str(path))


def shared_imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Imports of another test module or of conftest, relative or through the package."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = [node.module] if node.module else [alias.name for alias in node.names]
            if node.level == 0:
                targets = [t.removeprefix("tests.") for t in targets if t.startswith("tests.")]
        elif isinstance(node, ast.Import):
            targets = [alias.name.removeprefix("tests.") for alias in node.names if alias.name.startswith("tests.")]
        else:
            continue
        for target in targets:
            top = target.split(".")[0]
            if top.startswith("test_") or top == "conftest":
                yield node.lineno, target


def test_no_test_module_imports_another_test_module_or_conftest() -> None:
    found = [f"{name}:{line}: imports {target}" for name, tree in sources() for line, target in shared_imports(tree)]
    assert found == [], "share code through tests/helpers.py (fixtures: conftest.py):\n" + "\n".join(found)


def blocking_calls(function: ast.AsyncFunctionDef) -> Iterator[tuple[int, str]]:
    """Calls in the body of ``function`` itself (not in the functions it defines, which
    may run in a thread) to one of :data:`BLOCKING`."""
    todo: list[ast.AST] = list(function.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call) and ast.unparse(node.func) in BLOCKING:
            yield node.lineno, ast.unparse(node.func)
        todo.extend(ast.iter_child_nodes(node))


def test_no_async_def_calls_a_blocking_wait() -> None:
    found = []
    for name, tree in sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.AsyncFunctionDef):
                found += [f"{name}:{line}: {node.name} calls {call}(): use {BLOCKING[call]}"
                          for line, call in sorted(blocking_calls(node))]
    assert found == [], "\n".join(found)


def test_the_rules_find_what_they_forbid() -> None:
    """The two checks above, on a module that breaks both rules."""
    bad = ast.parse("from .test_receiver import alert\nfrom . import conftest\nimport tests.test_ha\n"
                    "from .helpers import alert\n"
                    "async def test_x():\n    wait_for(lambda: True, 1)\n    time.sleep(1)\n"
                    "    def in_a_thread():\n        time.sleep(1)\n")
    assert sorted(shared_imports(bad)) == [(1, "test_receiver"), (2, "conftest"), (3, "test_ha")]
    (function,) = [n for n in ast.walk(bad) if isinstance(n, ast.AsyncFunctionDef)]
    assert sorted(blocking_calls(function)) == [(6, "wait_for"), (7, "time.sleep")]
