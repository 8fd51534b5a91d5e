"""What importing each part of the package loads, checked in a fresh interpreter: the pure parts (policies, heads,
documents, keys, bundles) load neither llama.cpp nor torch, and the CLI (with what `eval` imports) never torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("llama_cpp", "torch", "transformers")


def loaded_after(*statements: str) -> set[str]:
    """The HEAVY modules in sys.modules after running `statements` in a fresh interpreter."""
    code = "\n".join([
        "import json, sys",
        *statements,
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_pure_modules_load_neither_llama_cpp_nor_torch():
    loaded = loaded_after(
        "import edge2dexit",
        "import edge2dexit.policies, edge2dexit.heads, edge2dexit.document, edge2dexit.keys, edge2dexit.bundle",
        "from edge2dexit import BundleError, InputError",
        "from edge2dexit.document import replay",
    )
    assert loaded == set()


def test_the_package_loads_llama_cpp_only_when_a_classifier_is_asked_for():
    """The control of the test above: the check does see llama.cpp once it is loaded."""
    assert "llama_cpp" in loaded_after("from edge2dexit import Classifier")
    assert "torch" not in loaded_after("from edge2dexit import Classifier")


@pytest.mark.parametrize("imports", [
    ("import edge2dexit.cli",),
    ("import edge2dexit.cli", "import edge2dexit.convert.data, edge2dexit.evaluate"),  # what `eval` imports
    ("import edge2dexit.cli", "import edge2dexit.convert.settings, edge2dexit.convert.features"),
])
def test_cli_and_eval_never_import_torch(imports):
    loaded = loaded_after(*imports)
    assert "torch" not in loaded and "transformers" not in loaded


def test_only_training_imports_torch():
    assert "torch" in loaded_after("import edge2dexit.convert.train")
