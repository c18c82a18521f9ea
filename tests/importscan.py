"""Which non-standard-library packages a source file imports, read with `ast` (nothing runs)."""
import ast
import sys


def imported_packages(path, module_level_only=False):
    """Top-level package names imported by the file at `path`, the standard library left out.

    module_level_only: only the imports that run when the file is imported (the file's body),
    not the lazy ones inside functions.
    """
    tree = ast.parse(open(path).read())
    nodes = tree.body if module_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the file must stand alone)"
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names)
