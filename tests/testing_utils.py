"""Helpers shared by tests (on sys.path through pytest's ``pythonpath`` setting)."""
import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str) -> ModuleType:
    """Import a script of the repo that is not part of the package (tools/*.py, benchmarks/*.py) by path."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
