"""Dependencies point one way: every import in the package, at module level or inside a
function, goes to a module of the same layer or a lower one (docs/architecture.md, "Layers").

A lower layer that must call a higher one gets a callable handed down instead (the backend's
compile_graph reaches memsave.Config and the pipeline runtime that way)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "memsave"

# Bottom to top; a module belongs to the longest prefix listed. Keep in step with
# docs/architecture.md.
LAYERS = [
    ("memsave.version", "memsave.config", "memsave.graph", "memsave.weight_keys"),
    ("memsave.memory",),
    ("memsave.ops", "memsave.kv_tensor", "memsave.report", "memsave.calibrate", "memsave.models", "memsave.checkpoint",
     "memsave.optim"),
    ("memsave.weights", "memsave.debug"),
    ("memsave.passes",),
    ("memsave.codegen", "memsave.budget"),
    ("memsave.pipeline",),
    ("memsave.distributed",),
    ("memsave.backend",),
    ("memsave.serialize", "memsave.explain", "memsave.compress_on_load"),
    ("memsave.cli", "memsave"),
]


def layer_of(module: str) -> int:
    best, level = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    assert level is not None, f"{module} is in no layer: add it to LAYERS and to docs/architecture.md"
    return level


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """memsave modules `path` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name` names an attribute
                target = target.rpartition(".")[0]
            if target and target.startswith("memsave") and target != name:
                out.add(target)
    return out


def test_imports_point_down():
    known = modules()
    upward = []
    for name, path in sorted(known.items()):
        for target in sorted(imports(path, name, known)):
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "imports that point up:\n  " + "\n  ".join(upward)


def test_the_check_sees_function_level_imports():
    known = modules()
    # runtime.py imports describe_inputs inside compile_pipeline, not at module level
    assert "memsave.graph.inputs" in imports(known["memsave.distributed.runtime"], "memsave.distributed.runtime", known)
    assert layer_of("memsave.backend") > layer_of("memsave.distributed") > layer_of("memsave.passes.dynamo.shard_tensor")
