"""What importing each part of the package loads, checked in a fresh interpreter: the pure parts (policies, heads,
documents, keys, bundles) load neither llama.cpp nor torch; the CLI (with what `eval` imports) never torch, and
llama.cpp only in a command that reads a model; the runtime nothing of `measure`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import helpers

HEAVY = ("llama_cpp", "torch", "transformers")


def loaded_after(*statements: str) -> set[str]:
    """The HEAVY modules loaded after running `statements` in a fresh interpreter."""
    return helpers.loaded_after(list(statements), HEAVY)


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
    ("import edge2dexit.cli", "import edge2dexit.convert.data, edge2dexit.measure.evaluate"),  # what `eval` imports
    ("import edge2dexit.cli", "import edge2dexit.convert.settings, edge2dexit.convert.features"),
])
def test_cli_and_eval_never_import_torch(imports):
    loaded = loaded_after(*imports)
    assert "torch" not in loaded and "transformers" not in loaded


def test_only_training_imports_torch():
    assert "torch" in loaded_after("import edge2dexit.convert.train")


@pytest.mark.parametrize("argv", [["--help"], ["models", "list"], ["classify", "--help"], ["bench", "soak", "--help"],
                                  ["models"], ["bench"], ["convert", "--help"], ["eval", "--help"]])
def test_commands_that_read_no_model_load_neither_llama_cpp_nor_numpy(argv):
    """On a CUDA build, loading libllama initialises the GPU: help, `models list` and a group's name alone must not
    pay for it; nor for numpy and gguf-py, which a command that reads nothing does not need."""
    loaded = helpers.loaded_after([
        "from edge2dexit.cli import main",
        f"sys.argv = ['edge2dexit', *{argv!r}]",
        "try:\n    main()\nexcept SystemExit as exit:\n    assert exit.code in (0, 2, None), exit.code",
    ], ("llama_cpp", "numpy", "gguf"))
    assert loaded == set()


RUNTIME = ("texts", "sentences", "llama", "document", "engine", "heads", "policies", "bundle", "models", "classifier",
           "settings", "lifetime", "files", "tables", "keys", "cache", "errors")


def test_the_runtime_imports_nothing_from_measure_or_convert():
    code = "\n".join([
        "import sys",
        *(f"import edge2dexit.{name}" for name in RUNTIME),
        "print([m for m in sys.modules if m.startswith(('edge2dexit.measure', 'edge2dexit.convert'))])",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def first_imported(command: str, *modules: str) -> list[str]:
    """`modules` in the order a fresh interpreter first imports them while running `command` (an audit hook sees
    every import)."""
    code = "\n".join([
        "import sys",
        "order = []",
        f"watched = {modules!r}",
        "sys.addaudithook(lambda event, args: event == 'import' and args[0] in watched and args[0] not in order"
        " and order.append(args[0]))",
        "try:",
        *(f"    {line}" for line in command.splitlines()),
        "finally:",
        "    print('imported:', *order)",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[-1].split()[1:]


@pytest.mark.parametrize("argv", [
    ["classify", "edge2dexit/models/sample_review.txt", "--n-ctx", "512"],
    ["bench", "soak", "--docs", "3", "--cycles", "3"],
])
def test_commands_that_read_a_model_load_llama_cpp_before_numpy(argv):
    """On a CUDA build a process that loaded numpy first crashes as it loads a model (docs/llama-cpp.md §10): the
    CLI loads llama.cpp's libraries first."""
    command = f"sys.argv = ['edge2dexit', *{argv!r}]\nfrom edge2dexit.cli import main\ntry:\n    main()\n" \
              "except SystemExit as exit:\n    assert exit.code in (0, None), exit.code"
    assert first_imported(command, "numpy", "llama_cpp") == ["llama_cpp", "numpy"]


@pytest.mark.parametrize("statement", ["from edge2dexit import Classifier", "import edge2dexit.classifier",
                                       "import edge2dexit.engine",
                                       "from edge2dexit import EngineSettings\nfrom edge2dexit import Classifier",
                                       "from edge2dexit import Result\nfrom edge2dexit import Classifier"])
def test_the_library_s_ways_in_load_llama_cpp_before_numpy(statement):
    assert first_imported(statement, "numpy", "llama_cpp") == ["llama_cpp", "numpy"]


def test_settings_load_without_numpy_and_dir_lists_the_public_names():
    assert helpers.loaded_after(["from edge2dexit import EngineSettings"], ("numpy", "llama_cpp")) == set()
    import edge2dexit

    assert {"Classifier", "Result", "Evidence", "Stream", "EngineSettings", "train", "EarlyExitClassifier",
            "InputError"} <= set(dir(edge2dexit)) and "importlib" not in dir(edge2dexit)


def test_a_ray_worker_loads_llama_cpp_before_numpy():
    """A Ray worker has not imported numpy when it imports `ray_data` to run the classifying actor (checked with
    Ray 2.x: a fresh worker holds neither); that import loads llama.cpp before pyarrow loads numpy."""
    assert first_imported("import edge2dexit.ray_data", "numpy", "llama_cpp") == ["llama_cpp", "numpy"]


@pytest.mark.llama
def test_a_process_that_imported_numpy_and_pandas_first_classifies():
    """The order a Ray worker, a notebook or an application may well have. It crashes on a CUDA build of llama.cpp
    (docs/llama-cpp.md §10, cause not found yet); everywhere else it must classify."""
    from edge2dexit.llama import gpu_offload

    if gpu_offload():
        pytest.xfail("numpy loaded before llama.cpp crashes a CUDA build as it loads a model (docs/llama-cpp.md §10)")
    code = ("import numpy, pandas\n"
            "from edge2dexit import Classifier\n"
            "from edge2dexit.settings import EngineSettings\n"
            "with Classifier(settings=EngineSettings(n_ctx=512)) as clf:\n"
            "    print(clf.classify('A wonderful film. I loved every minute of it.').label)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "positive"


@pytest.mark.parametrize("preset, expected", [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                             ({"OMP_WAIT_POLICY": "ACTIVE"}, "unset")])
def test_llama_cpp_loads_with_openmp_threads_that_spin_briefly_unless_the_user_said_otherwise(preset, expected):
    """libgomp reads its settings once, when llama.cpp loads it (native.py, docs/llama-cpp.md §11)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | preset
    code = ("import os, sys, edge2dexit.llama; assert 'llama_cpp' in sys.modules; "
            "print(os.environ.get('GOMP_SPINCOUNT', 'unset'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
