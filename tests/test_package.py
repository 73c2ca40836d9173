"""The package surface: torch-free import, lazy names, __all__, typing markers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import llmio_native as lio


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_does_not_import_torch():
    # The CLI and worker processes import the package; torch costs seconds and GBs of maps.
    out = run("import llmio_native, llmio_native.dataset, sys; "
              "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); print(bad)")
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_names_load_on_first_use():
    out = run("import llmio_native as lio, sys; assert 'torch' not in sys.modules; "
              "L = lio.TokenLoader; import llmio_native.loader as m; assert L is m.TokenLoader; "
              "assert 'torch' in sys.modules; d = lio.ddp; assert hasattr(d, 'int8_compress_hook'); print('ok')")
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
    assert "TokenLoader" in dir(lio)


def test_all_lists_only_public_names_that_exist():
    for name in lio.__all__:
        assert not name.startswith("_") or name == "__version__", name
        assert getattr(lio, name) is not None, name


def test_typing_markers_ship():
    pkg = Path(lio.__file__).parent
    assert (pkg / "py.typed").exists()
    for mod in ("_core", "_cuda"):
        assert (pkg / f"{mod}.pyi").exists(), f"{mod}.pyi missing"


def test_stubs_name_everything_the_modules_export():
    # Stale stubs mislead type checkers and editors: regenerate with tools/gen_stubs.sh.
    import ast

    from llmio_native import _native

    pkg = Path(lio.__file__).parent
    for name, mod in (("_core", _native._core), ("_cuda", _native._cuda)):
        if mod is None:
            continue
        tree = ast.parse((pkg / f"{name}.pyi").read_text())
        stubbed = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        stubbed |= {t.id for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        public = {n for n in dir(mod) if not n.startswith("_")}
        missing = sorted(public - stubbed)
        assert not missing, f"{name}.pyi lacks {missing}: run tools/gen_stubs.sh"
