"""The core asks integrations through coreset_optim.extensions and never imports them."""

from __future__ import annotations

import ast
import contextlib
import pathlib

import pytest
import torch

from coreset_optim import CoresetOptimizer, extensions
from coreset_optim.extensions import ModelExtension, register_extension

from core_utils import TwoLayer, make_batch, regression_loss

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "coreset_optim"


def _imported_modules(path: pathlib.Path) -> list[str]:
    """Absolute names of the coreset_optim modules ``path`` imports (relative imports resolved)."""
    package = ".".join(("coreset_optim", *path.relative_to(PACKAGE).parent.parts))
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module] + [f"{module}.{a.name}" for a in node.names]
    return names


def test_no_core_module_imports_an_integration():
    # datasets/ is data for the demo and the benchmarks, built on the integrations: not core
    core = [
        p
        for p in PACKAGE.rglob("*.py")
        if not {"integrations", "datasets"} & set(p.parts) and p != PACKAGE / "__init__.py"
    ]
    assert len(core) > 15
    offenders = {
        str(p.relative_to(PACKAGE)): [
            m for m in _imported_modules(p) if m.startswith(("coreset_optim.integrations", "coreset_optim.datasets"))
        ]
        for p in core
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    # the scan does see relative imports (a check that cannot fail would prove nothing)
    assert "coreset_optim.extensions" in _imported_modules(PACKAGE / "integrations" / "peft.py")
    assert "coreset_optim.integrations" in _imported_modules(PACKAGE / "__init__.py")


@pytest.fixture
def extension(monkeypatch):
    """Register a test extension for one test only."""

    def add(ext: ModelExtension) -> ModelExtension:
        monkeypatch.setitem(extensions.EXTENSIONS, ext.name, ext)
        return ext

    return add


def test_a_registered_default_comes_before_the_generic_rule(extension):
    seen = []

    def default(model, trained):
        seen.append(id(model.fc1.weight) in trained)
        return ["fc1"]

    model = TwoLayer()
    assert [
        t.name for t in CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2).sketch_layers
    ] == ["fc2"]
    extension(ModelExtension("test", default_sketch_modules=default))
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2)
    assert [t.name for t in opt.sketch_layers] == ["fc1"] and seen == [True]


def test_a_registered_check_refuses_targets(extension):
    def check(model, names):
        if "fc1" in names:
            raise ValueError("fc1 cannot be sketched here")

    extension(ModelExtension("test", check_sketch_layers=check))
    model = TwoLayer()
    CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2, sketch_modules="fc2")
    with pytest.raises(ValueError, match="fc1 cannot"):
        CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2, sketch_modules="fc1")


def test_a_registered_sketch_pass_wraps_the_sketch_pass_only(extension):
    events = []

    @contextlib.contextmanager
    def sketch_pass(model):
        events.append("enter")
        yield
        events.append("exit")

    model = TwoLayer()
    base = regression_loss(model)

    def loss_fn(batch):
        events.append("inside" if events and events[-1] in ("enter", "inside") else "outside")
        return base(batch)

    extension(ModelExtension("test", sketch_pass=sketch_pass))
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2, sketch_batch_size=4)
    opt.select(make_batch(8), loss_fn)
    # two sketch chunks inside one entered context, then the coreset's backward outside it
    assert events == ["enter", "inside", "inside", "exit", "outside"]


def test_register_extension_checks_its_argument_and_replaces_by_name(extension):
    with pytest.raises(TypeError, match="ModelExtension"):
        register_extension(lambda m: None)
    names = list(extensions.EXTENSIONS)
    assert names[:2] == ["peft", "training_features"]
    first = extension(ModelExtension("test"))
    second = extension(ModelExtension("test", check_sketch_layers=lambda m, n: None))
    assert extensions.EXTENSIONS["test"] is second is not first
