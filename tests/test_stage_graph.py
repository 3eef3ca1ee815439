"""Every DVC stage that runs `python -m gara.cli <command>` lists, as deps, each gara module it runs.

DVC decides whether a stage is stale from its deps alone: a stage whose deps miss a module its
command imports lets `dvc repro` reuse stale results after that module changes. This test reads
the stage files (yaml) and the code (ast), never runs DVC or the CLI, and computes, per stage,
a conservative superset of the gara files its command can execute:

- gara/cli.py's module-level code (imports, the app, `main()` under `__main__`), the command
  function, and every module-level function or class of gara/cli.py they name, transitively;
- then every import anywhere (module level or inside functions) in each gara module reached,
  transitively, with the `__init__.py` of every package on the way.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_FILES = ("dvc.yaml", "pipelines/comparison/dvc.yaml")
PACKAGE = "gara"
CLI = f"{PACKAGE}/cli.py"
CLI_CALL = re.compile(rf"\bpython[\d.]*\s+-m\s+{PACKAGE}\.cli\b(?P<args>[^;&|]*)")
TEMPLATE = re.compile(r"\$\{\s*(key|item(?:\.[\w.]+)?)\s*\}")


# --- stage files ----------------------------------------------------------------------------
def _substitute(value, key: str, item):
    """``${key}``, ``${item}`` and ``${item.X}`` of a foreach stage; other ``${...}`` stay as they are."""
    if isinstance(value, dict):
        return {k: _substitute(v, key, item) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, key, item) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(match: re.Match) -> str:
        found = key if match[1] == "key" else item
        for part in match[1].split(".")[1:]:
            found = found[part]
        return str(found)

    return TEMPLATE.sub(lookup, value)


def expand_stages(stage_file: str) -> dict[str, dict]:
    """Stage name (``train@gara`` for foreach stages) -> stage definition, as DVC names them."""
    stages = yaml.safe_load((ROOT / stage_file).read_text(encoding="utf-8")).get("stages") or {}
    expanded: dict[str, dict] = {}
    for name, stage in stages.items():
        if "matrix" in stage or ("foreach" in stage and not isinstance(stage["foreach"], dict | list)):
            raise AssertionError(f"{stage_file}:{name}: only literal foreach stages are understood here;"
                                 " extend expand_stages in tests/test_stage_graph.py")
        if "foreach" not in stage:
            expanded[name] = stage
            continue
        items = stage["foreach"]
        pairs = items.items() if isinstance(items, dict) else (
            (str(item) if not isinstance(item, dict | list) else str(index), item)
            for index, item in enumerate(items))
        for key, item in pairs:
            expanded[f"{name}@{key}"] = _substitute(stage["do"], str(key), item)
    return expanded


def commands(stage: dict) -> list[str]:
    cmd = stage.get("cmd") or []
    return [cmd] if isinstance(cmd, str) else list(cmd)


def dep_paths(stage_file: str, stage: dict) -> list[str]:
    """The stage's deps as paths relative to the repository root (deps are relative to wdir)."""
    wdir = (ROOT / stage_file).parent / stage.get("wdir", ".")
    paths = []
    for dep in stage.get("deps") or []:
        for path in [dep] if isinstance(dep, str) else dep:
            paths.append(Path(os.path.relpath(os.path.normpath(wdir / path), ROOT)).as_posix())
    return paths


def covered(path: str, deps: list[str]) -> bool:
    return any(dep == "." or path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def cli_stages() -> list[tuple[str, str, dict]]:
    return [(stage_file, name, stage) for stage_file in STAGE_FILES
            for name, stage in expand_stages(stage_file).items()
            if any(f"{PACKAGE}.cli" in cmd for cmd in commands(stage))]


# --- gara/cli.py: its commands and what each one runs ----------------------------------------
@functools.cache
def parse(path: str) -> ast.Module:
    return ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)


def _command_name(decorator: ast.expr, fn: ast.FunctionDef) -> str | None:
    """``@app.command("name")`` / ``@app.command(name=...)`` / ``@app.command()`` -> its name."""
    if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "command"):
        return None
    given = decorator.args[:1] + [k.value for k in decorator.keywords if k.arg == "name"]
    if given and isinstance(given[0], ast.Constant) and isinstance(given[0].value, str):
        return given[0].value
    return fn.name.lower().replace("_", "-")


@functools.cache
def cli_commands() -> dict[tuple[str, ...], ast.FunctionDef]:
    """``("train",)`` / ``("data", "validate")`` -> the function that runs it."""
    module = parse(CLI)
    groups: dict[str, tuple[str, str]] = {}  # sub-app variable -> (parent app variable, group name)
    for node in ast.walk(module):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_typer" and isinstance(node.func.value, ast.Name)
                and node.args and isinstance(node.args[0], ast.Name)):
            name = next((k.value.value for k in node.keywords if k.arg == "name"), None)
            assert isinstance(name, str), f"{CLI}:{node.lineno}: give add_typer a literal name="
            groups[node.args[0].id] = (node.func.value.id, name)

    def prefix(app: str) -> tuple[str, ...]:
        return prefix(groups[app][0]) + (groups[app][1],) if app in groups else ()

    found = {}
    for fn in module.body:
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in fn.decorator_list:
                name = _command_name(decorator, fn)
                if name is not None and isinstance(decorator.func.value, ast.Name):
                    found[prefix(decorator.func.value.id) + (name,)] = fn
    return found


def find_command(cmd: str) -> list[tuple[str, ...]]:
    """The gara.cli commands a command line runs; AssertionError for one that names none."""
    found = []
    for match in CLI_CALL.finditer(cmd):
        words = [w for w in match["args"].split() if not w.startswith("-")][:2]
        for n in (2, 1):
            if len(words) >= n and tuple(words[:n]) in cli_commands():
                found.append(tuple(words[:n]))
                break
        else:
            known = sorted(" ".join(c) for c in cli_commands())
            raise AssertionError(f"`{match[0].strip()}` names no command of {CLI}; known: {known}")
    return found


def _imports(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)]


def cli_imports(command: tuple[str, ...]) -> list[ast.Import | ast.ImportFrom]:
    """Imports the command can run in gara/cli.py: module-level code, the command function and
    the module-level functions / classes they name (transitively)."""
    module = parse(CLI)
    defs = {n.name: n for n in module.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    # Module-level code: plain statements, plus the decorators and defaults of every def (all
    # evaluated on import).
    todo: list[ast.AST] = [n for n in module.body if n not in defs.values()]
    for node in defs.values():
        todo += node.decorator_list
        if not isinstance(node, ast.ClassDef):
            todo += node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
    todo.append(cli_commands()[command])
    seen: set[str] = set()
    imports = []
    while todo:
        node = todo.pop()
        imports += _imports(node)
        for name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & defs.keys() - seen:
            seen.add(name)
            todo.append(defs[name])
    return imports


# --- gara modules: files and imports ---------------------------------------------------------
def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def module_file(name: str) -> str | None:
    """``gara.a.b`` -> ``gara/a/b.py`` or ``gara/a/b/__init__.py``; None if it is not a module."""
    base = name.replace(".", "/")
    for path in (f"{base}.py", f"{base}/__init__.py"):
        if (ROOT / path).is_file():
            return path
    return None


def imported_files(node: ast.Import | ast.ImportFrom, importer: str) -> set[str]:
    """The gara files an import statement executes: the module, the packages above it, and for
    ``from X import y`` the submodule X.y when y is one."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package, up level - 1
            package = module_name(importer).split(".")
            package = package if importer.endswith("__init__.py") else package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    files = set()
    for name in names:
        parts = name.split(".")
        if parts[0] != PACKAGE:
            continue
        for n in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:n]))
            if path is not None:
                files.add(path)
    return files


def closure(command: tuple[str, ...]) -> dict[str, str]:
    """Every gara file the command can execute (a superset: all imports of every file reached),
    each with the file that first imported it (gara/cli.py: itself)."""
    importer = {CLI: CLI}
    for node in cli_imports(command):
        importer |= {path: CLI for path in sorted(imported_files(node, CLI)) if path not in importer}
    todo = sorted(importer.keys() - {CLI})
    while todo:
        path = todo.pop()
        for node in _imports(parse(path)):
            new = sorted(imported_files(node, path) - importer.keys())
            importer |= {file: path for file in new}
            todo += new
    return importer


def import_chain(path: str, importer: dict[str, str]) -> str:
    """``gara/cli.py -> gara/config.py -> ...``: why the command runs ``path``."""
    chain = [path]
    while chain[-1] != CLI:
        chain.append(importer[chain[-1]])
    return " -> ".join(reversed(chain))


def exempt(path: str) -> bool:
    # gara/__init__.py and docstring-only __init__.py files need no dep (they cannot change behaviour).
    if path == f"{PACKAGE}/__init__.py":
        return True
    body = parse(path).body if path.endswith("/__init__.py") else None
    return body is not None and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


# --- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stage_file", "name", "stage"),
    [pytest.param(*s, id=f"{s[0]}:{s[1]}") for s in cli_stages()],
)
def test_stage_deps_cover_the_modules_its_command_runs(stage_file, name, stage):
    deps = dep_paths(stage_file, stage)
    ran = list(dict.fromkeys(command for cmd in commands(stage) for command in find_command(cmd)))
    assert ran, f"{stage_file}:{name} mentions gara.cli but runs no `python -m gara.cli <command>`"
    importer: dict[str, str] = {}
    for command in ran:
        importer = closure(command) | importer
    missing = sorted(path for path in importer if not exempt(path) and not covered(path, deps))
    wdir = (ROOT / stage_file).parent / stage.get("wdir", ".")
    why = "\n".join(f"  {path}  ({import_chain(path, importer)})" for path in missing)
    suggest = "\n".join(f"  - {os.path.relpath(ROOT / path, wdir)}" for path in missing)
    assert not missing, (
        f"{stage_file}:{name} runs `gara {' / '.join(' '.join(c) for c in ran)}`, which imports "
        f"{len(missing)} gara file(s) missing from its deps (dvc repro would reuse stale results "
        f"after they change):\n{why}\nadd to the stage's deps (or a folder above them):\n{suggest}"
    )


def test_the_analysis_itself():
    """A wrong analysis (everything, nothing, a lost command) would make the test above useless."""
    assert {("train",), ("corrupt",), ("data", "validate")} <= cli_commands().keys()
    assert find_command("python -m gara.cli data validate data/val && echo ok") == [("data", "validate")]
    with pytest.raises(AssertionError, match="names no command"):
        find_command("python -m gara.cli no-such-command --out x")
    train, corrupt = closure(("train",)).keys(), closure(("corrupt",)).keys()
    assert {"gara/train/launcher.py", "gara/config.py", "gara/errors.py", "gara/allocator.py"} <= train
    assert {"gara/data/corrupt.py", "gara/config.py"} <= corrupt  # config: via _corrupt_params
    assert "gara/train/launcher.py" not in corrupt
    assert "gara/registry/promote.py" not in train
    stage = expand_stages("dvc.yaml")["train@gara"]
    assert "--set model.adapter.kind=gara --out artifacts/adapters/gara" in commands(stage)[0]
    assert dep_paths("pipelines/comparison/dvc.yaml", {"wdir": "../..", "deps": ["gara/x"]}) == ["gara/x"]
    assert covered("gara/models/adapters/lora.py", ["gara/models"])
    assert not covered("gara/modelsx.py", ["gara/models"])


def _out_paths(stage_file: str, stage: dict) -> list[str]:
    wdir = (ROOT / stage_file).parent / stage.get("wdir", ".")
    outs = [o if isinstance(o, str) else next(iter(o)) for key in ("outs", "metrics", "plots")
            for o in stage.get(key) or []]
    return [os.path.relpath(wdir / o, ROOT) for o in outs]


def _dvc_tracked() -> list[str]:
    """Folders tracked by the .dvc files at the repository root (data.dvc -> data)."""
    tracked = []
    for dvc_file in ROOT.glob("?*.dvc"):  # not the .dvc folder
        tracked += [o["path"] for o in yaml.safe_load(dvc_file.read_text(encoding="utf-8")).get("outs", [])]
    return tracked


@functools.cache
def _git_files() -> tuple[str, ...]:
    """Every file git tracks (source; generated data never is), listed once."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    return tuple(listed.stdout.splitlines())


def _in_git(path: str) -> bool:
    """A file git tracks, or a folder holding one."""
    return any(covered(tracked, [path]) for tracked in _git_files())


@pytest.mark.parametrize("stage_file", STAGE_FILES)
def test_every_dep_is_source_data_or_another_stages_output(stage_file: str):
    # A dep that no stage writes (a stage that lost its outs) leaves DVC without the edge:
    # `dvc repro` skips the producer in a fresh clone and its consumer fails on a missing folder.
    produced = [p for f in STAGE_FILES for s in expand_stages(f).values() for p in _out_paths(f, s)]
    known = produced + _dvc_tracked()
    orphans = {f"{name}: {dep}" for name, stage in expand_stages(stage_file).items()
               for dep in dep_paths(stage_file, stage)
               if not covered(dep, known) and not _in_git(dep)}
    assert not orphans, f"deps that no stage produces and nothing tracks: {sorted(orphans)}"
