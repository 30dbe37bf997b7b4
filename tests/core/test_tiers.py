"""The engine's tiers: the core imports neither hosts/, families/ nor standalone/; hosts never import families/ or
standalone/, families never standalone/; inference never imports training code; nothing in na_engine imports
ComfyUI; nothing imports in a circle; and the trainer's config, traced from train's entry, stays in training code."""

import ast
import builtins
import os

import pytest

ENGINE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "na_engine")


def imported(path):
    """Absolute names of what a module of na_engine imports (relative imports resolved)."""
    package = ["na_engine"] + os.path.relpath(os.path.dirname(path), ENGINE).replace(".", "").split(os.sep)
    package = [p for p in package if p]
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.update([module] if node.module else [f"{module}.{a.name}" for a in node.names])
    return names


def modules(folder=""):
    root = os.path.join(ENGINE, folder)
    return [os.path.join(root, f) for f in sorted(os.listdir(root)) if f.endswith(".py")]


CORE = [m for m in modules() if os.path.basename(m) not in ("__init__.py", "__main__.py")]


@pytest.mark.parametrize("path", CORE, ids=os.path.basename)
def test_core_imports_no_host_and_no_standalone_code(path):
    bad = {n for n in imported(path) if n.startswith(("na_engine.hosts", "na_engine.standalone"))}
    assert not bad, f"{os.path.basename(path)} imports {bad}"


@pytest.mark.parametrize("path", modules("hosts"), ids=os.path.basename)
def test_hosts_import_no_standalone_code(path):
    assert not {n for n in imported(path) if n.startswith(("na_engine.standalone", "na_engine.families"))}


@pytest.mark.parametrize("path", modules("families"), ids=os.path.basename)
def test_families_import_no_standalone_code(path):
    assert not {n for n in imported(path) if n.startswith("na_engine.standalone")}


@pytest.mark.parametrize("name", ["models.py", "generate.py", "cli.py"])
def test_inference_imports_no_training_code(name):
    training = ("train", "train_data", "prepare")
    bad = {n for n in imported(os.path.join(ENGINE, "standalone", name)) if n.split(".")[-1] in training}
    assert not bad, f"{name} imports {bad}"


def test_nothing_in_the_engine_imports_comfy():
    paths = [os.path.join(d, f) for d, _, files in os.walk(ENGINE) for f in files if f.endswith(".py")]
    bad = {
        p: n for p in paths for n in imported(p) if n == "comfy" or n.startswith(("comfy.", "folder_paths", "nodes"))
    }
    assert not bad


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__(__name__), "ENGINE", str(tmp_path))
    (tmp_path / "bad.py").write_text("from .hosts.comfy_patch import NestedRun\nfrom .standalone import train\n")
    assert {"na_engine.hosts.comfy_patch", "na_engine.standalone"} <= imported(str(tmp_path / "bad.py"))


# -- import cycles and the trainer's config -------------------------------------------------------------------------


def module_names(root=None):
    """Dotted name -> path of every module under ``root`` (a package's name is its __init__.py's)."""
    root = root or ENGINE
    names = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                parts = ["na_engine"] + os.path.relpath(os.path.join(folder, f[:-3]), root).split(os.sep)
                names[".".join(p for p in parts if p not in ("__init__", "."))] = os.path.join(folder, f)
    return names


def runtime_imports(path, root=None):
    """What a module imports when it runs: ``imported``, imports inside functions included (they are where a circle
    hides), ``if TYPE_CHECKING:`` blocks left out (annotations only)."""
    root = root or ENGINE
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = ["na_engine"] + [p for p in os.path.relpath(os.path.dirname(path), root).split(os.sep) if p != "."]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            module = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            names.update([module] + [f"{module}.{a.name}" for a in node.names])
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.name for a in node.names) if isinstance(node, ast.Import) else names.add(node.module)
    return names


def import_graph(root=None):
    """Module -> the engine modules it runs: each one it names, and the packages above them that are not above
    itself (importing a.b.c runs a.b's __init__ first; a package above a module is already running)."""
    known = module_names(root)
    graph = {}
    for name, path in known.items():
        own = {name.rsplit(".", k)[0] for k in range(name.count(".") + 1)}
        targets = {t for t in runtime_imports(path, root) if t in known}
        graph[name] = {p for t in targets for p in (t.rsplit(".", k)[0] for k in range(t.count(".") + 1))} - own
    return graph


def find_cycle(graph):
    """One import circle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_engine_has_no_import_cycle():
    """standalone/ (and every tier) imports without a circle, none dodged by an import inside a function."""
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))
    assert "na_engine.families" in import_graph()["na_engine.standalone.train"]  # the graph sees the real imports


def test_the_cycle_finder_sees_a_circle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "standalone"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n"
                              "def f():\n    from .a import g\n")  # fmt: skip
    (pkg / "c.py").write_text("from .b import f\n")
    cycle = find_cycle(import_graph(str(tmp_path)))
    assert cycle == ["na_engine.standalone.a", "na_engine.standalone.b", "na_engine.standalone.a"]
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n")
    assert find_cycle(import_graph(str(tmp_path))) is None  # an annotation-only import is no circle


TRAINING = ("train", "train_data", "prepare")  # the training modules (test_inference_imports_no_training_code's)
# what may take the trainer's config: the training modules and the one validation pass, which reads every option
# from the table the parser is generated from (it serves generate too, so it is not a training module)
CONFIG_READERS = (*TRAINING, "validate")
# calls the tracer cannot follow that are known to stay put: validate.NEEDS's predicates, each a lambda reading the
# config's own fields (or _has_masks, the prepared set's record); dataclasses.* calls only introspect the config
TABLE_CALLS = {("na_engine.standalone.validate", "present")}


class Module:
    """A module's functions (methods as Class.name), classes, and the names its imports bind."""

    def __init__(self, name, path):
        self.name, self.tree = name, ast.parse(open(path).read())
        self.functions, self.classes, self.bindings = {}, set(), {}
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef):
                self.classes.add(node.name)
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        self.functions[f"{node.name}.{item.name}"] = item
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    self.bindings[a.asname or a.name] = (module, a.name)


def trace_config(root=None, entry=("na_engine.standalone.train", "train", "cfg")):
    """Follow the trainer's config from ``entry`` (module, function, parameter) through every call handed it: as a
    name bound to it, as ``<x>.cfg``, or as a name bound to what holds it (a call's result that returns it, or a
    class built with it, as setup's Session).  Returns (the functions reached, calls handed it that no module here
    defines)."""
    modules = {name: Module(name, path) for name, path in module_names(root).items()}
    memo, reached, unresolved = {}, set(), set()

    def analyse(mod, fn, tainted):
        """Trace one function whose parameters ``tainted`` hold the config; whether it returns the config."""
        key = (mod, fn, frozenset(tainted))
        if key in memo:
            return memo[key]
        memo[key] = False  # while in progress (recursion)
        node, tainted = modules[mod].functions[fn], set(tainted)

        def carries(expr):
            return (isinstance(expr, ast.Name) and expr.id in tainted) or (
                isinstance(expr, ast.Attribute) and expr.attr == "cfg"
            )

        def follow(call):
            """Trace the callee of a call handed the config; whether its result holds it."""
            positions = [i for i, a in enumerate(call.args) if carries(a)]
            keywords = {k.arg for k in call.keywords if carries(k.value)}
            if not positions and not keywords:
                return False
            target = _callee(modules, mod, call.func)
            if target is None:
                name = ast.unparse(call.func)
                builtin = isinstance(call.func, ast.Name) and call.func.id in dir(builtins)
                if not (builtin or name.startswith("dataclasses.") or (mod, name) in TABLE_CALLS):
                    unresolved.add((mod, fn, name))
                return False
            reached.add(target)
            definition = modules[target[0]].functions.get(target[1])
            if definition is None:  # a class without an __init__ of its own (a dataclass): it holds the config
                return True
            params = [a.arg for a in definition.args.posonlyargs + definition.args.args]
            method = "." in target[1] and "staticmethod" not in [ast.unparse(d) for d in definition.decorator_list]
            params = params[1:] if method else params
            names = {params[i] for i in positions if i < len(params)} | keywords
            return analyse(target[0], target[1], names) or target[1].endswith(".__init__")

        for _ in range(2):  # assignments in any order; a, b = x, y pairwise
            for a in [a for a in ast.walk(node) if isinstance(a, ast.Assign)]:
                pairs = [(t, a.value) for t in a.targets]
                if isinstance(a.value, ast.Tuple) and all(isinstance(t, ast.Tuple) for t in a.targets):
                    pairs = [pair for t in a.targets for pair in zip(t.elts, a.value.elts)]
                for target, value in pairs:
                    if carries(value) or (isinstance(value, ast.Call) and follow(value)):
                        tainted |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
        for call in [c for c in ast.walk(node) if isinstance(c, ast.Call)]:
            follow(call)
        returns = [r.value for r in ast.walk(node) if isinstance(r, ast.Return) and r.value is not None]
        memo[key] = any(carries(v) or (isinstance(v, ast.Call) and follow(v)) for v in returns)
        return memo[key]

    analyse(*entry[:2], {entry[2]})
    return reached, unresolved


def _callee(modules, mod, func):
    """(module, function) a call's func names, as its module's definitions and imports bind it; else None."""
    here = modules[mod]
    if isinstance(func, ast.Name):
        return _defined(modules, mod, func.id)
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        owner = _defined(modules, mod, func.value.id)
        if owner is not None and owner[1] in modules[owner[0]].classes:
            return owner[0], f"{owner[1]}.{func.attr}"
        module, name = here.bindings.get(func.value.id, (None, None))
        submodule = f"{module}.{name}"
        if submodule in modules:
            return _defined(modules, submodule, func.attr)
    return None


def _defined(modules, mod, name):
    here = modules[mod]
    if name in here.functions:
        return mod, name
    if name in here.classes:
        return (mod, f"{name}.__init__") if f"{name}.__init__" in here.functions else (mod, name)
    module, original = here.bindings.get(name, (None, None))
    return _defined(modules, module, original) if module in modules else None


def climbs(reached):
    return sorted({m for m, _ in reached if m.rpartition(".")[2] not in CONFIG_READERS})


def test_the_trainers_config_stays_inside_training():
    """Traced from train's entry, the config is handed only to training code: it never climbs back into a family,
    a host or an inference module (models.py, generate.py), which take what they need as plain values."""
    reached, unresolved = trace_config()
    assert not climbs(reached) and not unresolved, (climbs(reached), unresolved)
    assert {("na_engine.standalone.train", "setup"), ("na_engine.standalone.train_data", "RowDraws.draw")} <= reached


def test_the_config_tracer_sees_a_climb(tmp_path):
    pkg = tmp_path / "standalone"
    pkg.mkdir()
    (pkg / "train.py").write_text(
        "from . import models\nfrom .train_data import Draws\n\ndef train(cfg):\n    run = setup(cfg)\n"
        "    options, n = run.cfg, 1\n    Draws.draw(options, n)\n    models.helper(1, run)\n\n"
        "def setup(options):\n    return options\n"
    )
    (pkg / "train_data.py").write_text("class Draws:\n    @classmethod\n    def draw(cls, cfg, n):\n        pass\n")
    (pkg / "models.py").write_text("def helper(n, run):\n    print(run)\n")
    reached, unresolved = trace_config(str(tmp_path))
    assert climbs(reached) == ["na_engine.standalone.models"] and not unresolved
    assert ("na_engine.standalone.train_data", "Draws.draw") in reached
