"""List the functions of wsiseg/ (or the folders given) over 80 lines or over 10 parameters; exit 1 if any.

    python tools/function_limits.py [FOLDER ...]

Parameters are counted as a caller sees them: `self`/`cls` left out, `*args` and `**kwargs` one each.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 80
MAX_PARAMETERS = 10
ROOT = Path(__file__).resolve().parent.parent


def parameter_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The parameters a caller can pass, `self`/`cls` left out."""
    arguments = function.args
    positional = [*arguments.posonlyargs, *arguments.args]
    count = len(positional) + len(arguments.kwonlyargs) + bool(arguments.vararg) + bool(arguments.kwarg)
    return count - bool(positional and positional[0].arg in ("self", "cls"))


def offenders(folder: Path) -> list[str]:
    """`path:line name (N lines, M parameters)` of every function over a limit below `folder`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines, parameters = node.end_lineno - node.lineno + 1, parameter_count(node)
                if lines > MAX_LINES or parameters > MAX_PARAMETERS:
                    found.append(f"{path}:{node.lineno} {node.name} ({lines} lines, {parameters} parameters)")
    return found


def main() -> None:
    folders = [Path(arg) for arg in sys.argv[1:]] or [ROOT / "wsiseg"]
    found = [line for folder in folders for line in offenders(folder)]
    print("\n".join(found) if found else f"no function over {MAX_LINES} lines or {MAX_PARAMETERS} parameters")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
