"""Collect bench/bench_*.py as pytest modules (testpaths and python_files cover tests/ only)."""
import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; adding it again would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
