"""The package layout (docs/package.md): no import cycles among the project's modules, and the command-line
module imported by no library module: core.cli holds the scripts' entry points and imports the engines."""
import ast
import os

from conftest import REPO

# Library modules that import core.cli: none (the scripts' entry points are in core.cli, see docs/package.md).
CLI_USERS = set()


def project_modules():
    """{module name: set of project modules it imports} for the top level, core/ and benchmarks/."""
    files = {}
    for folder in ("", "core", "benchmarks"):
        for name in sorted(os.listdir(os.path.join(REPO, folder or "."))):
            if name.endswith(".py"):
                module = ".".join(filter(None, [folder, name[:-3]])).replace(".__init__", "")
                files[module] = os.path.join(REPO, folder, name)
    graph = {}
    for module, path in files.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[module] = {name for name in imported if name in files and name != module}
    return graph


def test_the_import_graph_has_no_cycle():
    graph, done, path = project_modules(), set(), []

    def visit(module):
        assert module not in path, "import cycle: " + " -> ".join(path[path.index(module):] + [module])
        if module in done:
            return
        path.append(module)
        for name in sorted(graph[module]):
            visit(name)
        path.pop()
        done.add(module)
    for module in sorted(graph):
        visit(module)


def test_no_library_module_imports_the_command_line_module():
    graph = project_modules()
    library = {module for module in graph if module.startswith("core.") and module != "core.cli"}
    assert {module for module in library if "core.cli" in graph[module]} == CLI_USERS
    assert "core.cli" not in graph["core.errors"] and not graph["core.errors"]
