"""What makes a process that imported numpy first crash in llama_model_load_from_file on a CUDA build (docs/llama-cpp.md
§10): the crash reproduced, then numpy's libraries preloaded one by one, environment variables that change threading,
RTLD_DEEPBIND, and which symbols of the llama.cpp libraries bind into numpy's. MODEL: a GGUF file to load."""
import glob
import os
import subprocess
import sys

MODEL = os.environ["MODEL"]
LOAD = ("import llama_cpp\n"
        "llama_cpp.llama_backend_init()\n"
        "p = llama_cpp.llama_model_default_params(); p.n_gpu_layers = 0\n"
        f"m = llama_cpp.llama_model_load_from_file({MODEL!r}.encode(), p)\n"
        "print('loaded', bool(m))\n")


def run(label, before="", env=None, timeout=60):
    try:
        r = subprocess.run([sys.executable, "-c", before + "\n" + LOAD], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, **(env or {})})
        tail = (r.stdout.strip().splitlines() or [""])[-1]
        print(f"{label:70} rc={r.returncode:4} {tail}", flush=True)
        return r.returncode
    except subprocess.TimeoutExpired:
        print(f"{label:70} timeout", flush=True)


import numpy  # noqa: E402  (only to find its files; the runs above are subprocesses)
np_dir = os.path.dirname(numpy.__file__)
libs = sorted(glob.glob(os.path.join(os.path.dirname(np_dir), "numpy.libs", "*.so*")))
exts = sorted(glob.glob(os.path.join(np_dir, "_core", "*.so")) + glob.glob(os.path.join(np_dir, "core", "*.so")))
print("python", sys.version.split()[0], "numpy", numpy.__version__, np_dir)
print("numpy.libs:", [os.path.basename(l) for l in libs])
try:
    numpy.show_config()
except Exception as exc:
    print("show_config:", exc)
sys.stdout.flush()

run("control: llama_cpp only")
run("numpy first", "import numpy")
run("numpy first, OPENBLAS_NUM_THREADS=1", "import numpy", {"OPENBLAS_NUM_THREADS": "1"})
run("numpy first, OMP_NUM_THREADS=1", "import numpy", {"OMP_NUM_THREADS": "1"})
run("numpy first, GGML_CUDA_DISABLE_GRAPHS=1", "import numpy", {"GGML_CUDA_DISABLE_GRAPHS": "1"})
run("numpy first, CUDA_VISIBLE_DEVICES='' ", "import numpy", {"CUDA_VISIBLE_DEVICES": ""})
for lib in libs + exts[:1]:
    for mode in ("RTLD_LOCAL", "RTLD_GLOBAL"):
        run(f"preload {os.path.basename(lib)[:40]} {mode}", f"import ctypes, os; ctypes.CDLL({lib!r}, os.{mode})")
import importlib.util
site = os.path.join(os.path.dirname(importlib.util.find_spec("llama_cpp").origin), "lib")
order = ["libggml-base.so", "libggml-cpu.so", "libggml-cuda.so", "libggml.so", "libllama.so"]
pre = "; ".join(f"ctypes.CDLL({os.path.join(site, n)!r}, os.RTLD_GLOBAL | os.RTLD_DEEPBIND)" for n in order
                if os.path.exists(os.path.join(site, n)))
run("numpy first, then llama libs with RTLD_DEEPBIND", "import numpy, ctypes, os; " + pre)
run("numpy first, import torch first of all", "import torch, numpy")
for n in order:
    p = os.path.join(site, n)
    if os.path.exists(p):
        out = subprocess.run(["ldd", p], capture_output=True, text=True).stdout
        print(f"ldd {n}:", " ".join(l.split()[0] for l in out.splitlines()), flush=True)
# who binds to whom when numpy came first: symbols of the llama/ggml libraries resolved in numpy's libraries
env = {"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": "/tmp/lddebug"}
run("numpy first under LD_DEBUG=bindings", "import numpy", env)
lines = []
for f in glob.glob("/tmp/lddebug*"):
    for line in open(f, errors="replace"):
        if ("libggml" in line or "libllama" in line) and ("numpy" in line or "openblas" in line or "gfortran" in line
                                                         or "quadmath" in line or "gomp" in line):
            lines.append(line.strip())
print(f"{len(lines)} bindings from llama/ggml into numpy's libraries or OpenMP:")
for line in lines[:60]:
    print("  ", line)
