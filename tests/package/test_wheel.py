"""The wheel holds what an installed (not editable) copy needs: the package's folders and the
demo's pretrained base, which ``load_base`` reads from the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    # Built from a copy of the files git would commit: no build cache or egg-info of the checkout
    # can supply what the package configuration forgets.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("coreset_optim-*.whl")
    return path


def test_wheel_holds_every_subpackage_and_the_base_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("methods", "sketch", "precondition", "mixture", "integrations", "datasets"):
        assert f"coreset_optim/{folder}/__init__.py" in names, folder
    for file in ("config.json", "generation_config.json", "model.safetensors"):
        assert f"coreset_optim/datasets/base_model/{file}" in names, file


@pytest.mark.slow
def test_the_base_loads_from_an_installed_copy(wheel, tmp_path):
    pytest.importorskip("transformers")
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    script = (
        "import coreset_optim, coreset_optim.datasets.base_model as b\n"
        "model = b.load_base()\n"
        "print(coreset_optim.__file__)\n"
        "print(sum(p.numel() for p in model.parameters()))\n"
    )
    # -I: isolated, so neither the checkout (cwd) nor the editable install is on the path
    run = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r})\n" + script],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    where, count = run.stdout.split()
    assert Path(where).is_relative_to(site)
    assert int(count) > 0
