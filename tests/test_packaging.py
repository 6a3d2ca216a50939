"""No name of ours shadows an installed package, from any entry point, in any install form.

The repository root is on ``sys.path`` for ``python -m pytest``, ``python -c`` and every script run from a checkout
(tools/*.py and megagpt/pretrain.py put it there). ``kernels`` is both our top-level folder and a PyPI package that
transformers imports names from: the folder must never win. Each entry point here runs in a subprocess started from
the repository root with a ``sitecustomize`` probe on PYTHONPATH that, when the process exits (after the entry
point has set up its own ``sys.path``), records what ``import kernels`` and ``import megagpt.kernels`` give.
"""
import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from testing_utils import REPO

PROBE = '''
import atexit, json, os, sys

def _megagpt_import_probe():
    record = {"argv0": sys.argv[0] if sys.argv else "", "executable": sys.executable}
    try:
        import kernels
        record["kernels"] = getattr(kernels, "__file__", None) or str(list(kernels.__path__))
    except Exception as err:
        record["kernels_error"] = repr(err)
    try:
        import megagpt.kernels as ours
        record["megagpt_kernels"] = ours.__file__
        record["megagpt_kernels_has_attention"] = callable(getattr(ours, "alibi_flash_attention", None))
    except Exception as err:
        record["megagpt_kernels_error"] = repr(err)
    path = os.path.join(os.environ["MEGAGPT_PROBE_DIR"], f"{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(record, f)

atexit.register(_megagpt_import_probe)
'''


@pytest.fixture(scope="module")
def pypi_kernels_init() -> Path:
    """The installed PyPI ``kernels`` package's __init__.py (transformers depends on it; the lock installs it)."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the PyPI package `kernels` is not installed: these tests need it (requirements/cpu.lock has it)")
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


def _probe(tmp_path: Path, command: list[str], timeout: int = 300) -> list[dict]:
    """Run ``command`` from the repository root with the probe installed; the records of every process it started."""
    probe_dir, records_dir = tmp_path / "probe", tmp_path / "records"
    probe_dir.mkdir()
    records_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env.update(PYTHONPATH=str(probe_dir), MEGAGPT_PROBE_DIR=str(records_dir), OMP_NUM_THREADS="1",
               PYTHONNOUSERSITE="1")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    records = [json.loads(p.read_text()) for p in sorted(records_dir.glob("*.json"))]
    assert records, f"the probe recorded nothing for {command}"
    return records


def _assert_no_shadowing(records: list[dict], pypi_init: Path) -> None:
    for record in records:
        assert "kernels_error" not in record, record
        assert Path(record["kernels"]).resolve() == pypi_init, (
            f"`import kernels` in {record['argv0']!r} gave {record['kernels']}, not the PyPI package {pypi_init}")
        assert record.get("megagpt_kernels_has_attention") is True, record


def _python() -> str:
    return sys.executable


ENTRY_POINTS = {
    "python -c": [None, "-c", "pass"],
    "python -m pytest": [None, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/config"],
    "python tools/*.py": [None, "tools/convert_checkpoint.py", "--help"],
    "python megagpt/pretrain.py": [None, "megagpt/pretrain.py", "--config", "configs/tiny.json", "--dry-run"],
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_import_kernels_gives_the_pypi_package(name, tmp_path, pypi_kernels_init):
    command = [_python() if part is None else part for part in ENTRY_POINTS[name]]
    _assert_no_shadowing(_probe(tmp_path, command), pypi_kernels_init)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_launchers_import_the_pypi_kernels(launcher, tmp_path, pypi_kernels_init):
    bindir = Path(sys.executable).parent
    if launcher == "deepspeed":
        command = [str(bindir / "deepspeed"), "--num_gpus", "1", "megagpt/pretrain.py"]
    else:
        command = [str(bindir / "torchrun"), "--nproc_per_node", "1", "megagpt/pretrain.py"]
    records = _probe(tmp_path, command + ["--config", "configs/tiny.json", "--dry-run"])
    assert any(r["argv0"].endswith("pretrain.py") for r in records), records  # the rank itself, not only the launcher
    _assert_no_shadowing(records, pypi_kernels_init)


def test_transformers_modeling_utils_imports_from_the_repository_root(tmp_path):
    """The symptom users met: transformers imports names from the PyPI ``kernels`` at import time."""
    code = "import transformers.modeling_utils, megagpt.hf"
    proc = subprocess.run([_python(), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_a_regular_install_ships_megagpt_kernels(tmp_path, pypi_kernels_init):
    """``pip install .`` (a wheel): megagpt.kernels is a complete package inside the install, no top-level
    ``kernels`` of ours is installed, and from the repository root ``import kernels`` is still the PyPI one."""
    wheels = tmp_path / "wheels"
    subprocess.run([_python(), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("megagpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "megagpt/kernels/__init__.py" in names and "megagpt/kernels/alibi_attention.py" in names, names
    assert not [n for n in names if n.startswith("kernels/")], "the wheel installs a top-level `kernels`"

    site = tmp_path / "site"
    subprocess.run([_python(), "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    check = ("import megagpt.kernels as k, sys; "
             f"assert k.__file__.startswith({str(site)!r}), k.__file__; "
             f"assert list(k.__path__) == [{str(site / 'megagpt' / 'kernels')!r}], k.__path__; "
             "assert callable(k.alibi_flash_attention); import megagpt.data._helpers")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    proc = subprocess.run([_python(), "-c", check], cwd=outside, env={**env, "PYTHONPATH": str(site)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
