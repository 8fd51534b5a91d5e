"""Loading llama.cpp's libraries the way edge2dexit needs them: importing this module does it, once, and every
path into llama.cpp imports it first (`llama.py`, the CLI's `main`, `from edge2dexit import Classifier`).

- Before numpy, where the process has not loaded numpy yet: on a CUDA build of llama.cpp, a process that loaded
  numpy first crashes as it loads a model (docs/llama-cpp.md §10).
- With OpenMP's threads spinning only briefly before they sleep (`GOMP_SPINCOUNT=1000`, unless the user set it or
  OMP_WAIT_POLICY): llama.cpp's CPU backend (built with GCC's OpenMP) waits at a barrier after every graph node, and
  libgomp's default spin of 300,000 iterations, beside any other busy process on the cores, made decodes 2–30×
  slower; sleeping at once (OMP_WAIT_POLICY=PASSIVE) made every small decode ~40% slower on an idle machine.
  1,000 spins cost nothing on an idle machine and keep most of the gain under load (docs/llama-cpp.md §11). libgomp
  reads these variables once, when it is loaded: which is why they are set here, before llama.cpp loads it.
"""

from __future__ import annotations

import os

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import llama_cpp  # noqa: E402,F401  (loaded now, with the setting above)
