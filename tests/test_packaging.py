"""`pip install -e .` (README, Installation) after torch and detectron2 gives an importable
detkd."""

import ast
import configparser
import glob
import os
import re
import sys

from conftest import REPO

# What the README's installation steps provide besides DetKD's own requirements: torch,
# torchvision and detectron2 with the requirements of its setup.py (not its "all" extras).
_PROVIDED = {
    "torch",
    "torchvision",
    "detectron2",
    "numpy",
    "PIL",
    "matplotlib",
    "pycocotools",
    "termcolor",
    "yacs",
    "tabulate",
    "cloudpickle",
    "tqdm",
    "tensorboard",
    "fvcore",
    "iopath",
    "omegaconf",
    "hydra",
    "black",
    "packaging",
}
_DISTRIBUTION = {"PIL": "Pillow", "hydra": "hydra-core"}  # import name -> requirement name


def _third_party_imports():
    names = set()
    for path in glob.glob(
        os.path.join(REPO, "projects", "DetKD", "detkd", "**", "*.py"), recursive=True
    ):
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "detkd"}


def test_setup_cfg_requires_every_module_detkd_imports_that_detectron2_does_not_bring():
    # scipy (the DETR matcher, imported by `import detkd`) is only in detectron2's "all" extras:
    # the README's three pip commands left `import detkd` failing with "No module named 'scipy'"
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    declared = {
        re.split(r"[<>=!~;\[ ]", r.strip())[0].lower()
        for r in cfg.get("options", "install_requires", fallback="").splitlines()
        if r.strip()
    }
    needed = {_DISTRIBUTION.get(n, n).lower() for n in _third_party_imports() - _PROVIDED}
    assert "scipy" in needed  # the check sees the DETR matcher's import
    assert (
        needed <= declared
    ), f"setup.cfg [options] install_requires lacks {sorted(needed - declared)}"


def test_every_detkd_name_the_readme_and_the_code_cite_exists():
    """Dotted ``detkd.*`` names in the README, the package's messages and docstrings, the configs
    and the benchmarks resolve to a module or attribute (the README and an error message named
    ``detkd.losses.put_scalar``, which ``detkd.losses`` did not export)."""
    import importlib

    files = ["README.md"] + [
        p
        for pattern in ("projects/DetKD/detkd/**/*.py", "configs/**/*.py", "benchmarks/*.py")
        for p in glob.glob(os.path.join(REPO, pattern), recursive=True)
    ]
    cited = {}
    for path in files:
        with open(os.path.join(REPO, path)) as f:
            for name in re.findall(r"\bdetkd(?:\.[A-Za-z_]\w*)+", f.read()):
                cited.setdefault(name, os.path.relpath(path, REPO))

    def resolves(name):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
        return False

    assert {"detkd.losses.put_scalar", "detkd.modeling.build_yacs_detector"} <= set(cited)
    missing = {n: p for n, p in cited.items() if not resolves(n)}
    assert not missing, f"cited but not importable (name: first file): {missing}"


def test_every_public_name_resolves_and_engine_reexports_the_config_checks():
    """Each detkd module's ``__all__`` names an attribute it has (a name moved to another module
    and left in ``__all__`` fails ``from detkd.x import *``), and the checks that moved from
    ``detkd.engine`` to ``detkd.config_checks`` are still importable from engine as the same
    objects."""
    import importlib

    import detkd.config_checks as checks
    import detkd.engine as engine

    modules = sorted(
        os.path.relpath(p, os.path.join(REPO, "projects", "DetKD"))[: -len(".py")]
        .replace(os.sep, ".")
        .replace(".__init__", "")
        for p in glob.glob(os.path.join(REPO, "projects/DetKD/detkd/**/*.py"), recursive=True)
    )
    assert {"detkd", "detkd.engine", "detkd.config_checks", "detkd.losses.pkd"} <= set(modules)
    for name in modules:
        module = importlib.import_module(name)
        missing = [a for a in getattr(module, "__all__", []) if not hasattr(module, a)]
        assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    moved = set(engine.__all__) & set(checks.__all__)
    assert {"check_override_keys", "check_input_format", "check_student_classes"} <= moved
    from detkd import distiller, utils

    assert engine.student_of is distiller.student_of
    assert engine.unwrap_model is utils.unwrap_model and engine.file_prefix is utils.file_prefix
    assert all(getattr(engine, n) is getattr(checks, n) for n in moved)
    for name in checks.__all__:  # defined there, not imported from elsewhere
        assert getattr(checks, name).__module__ == "detkd.config_checks", name
