#!/usr/bin/env bash
# The GPU checks of docs/llama-cpp.md §10, on a machine with a CUDA build of llama-cpp-python importable (e.g.
# CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python==0.3.36) and the project's dependencies. Run from the
# project's root: bash tools/gpu-check/run.sh OUT_DIR [IMDB_TEST.jsonl]. Writes crash.txt, backtrace.txt,
# gpu-tests.txt, bench-engine.txt, throughput.txt, read-ahead.txt into OUT_DIR.
set -x
out=${1:?give an output directory}; data=${2:-}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
inc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
suf=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
[ -f edge2dexit/_tap$suf ] || gcc -O2 -shared -fPIC -I"$inc" edge2dexit/_tap.c -o edge2dexit/_tap$suf
nvidia-smi --query-gpu=name,memory.used --format=csv
e2d() { python3 -c "import llama_cpp, sys; sys.argv[0]='edge2dexit'; from edge2dexit.cli import main; main()" "$@"; }
e2d models pull smollm2-135m@q8_0
model=$(python3 -c "from edge2dexit.models import resolve_model; print(resolve_model('smollm2-135m', pull_missing=False))")
MODEL=$model timeout 150 python3 "$here/crash.py" > "$out/crash.txt" 2>&1
timeout 80 cuda-gdb --batch -ex run -ex bt --args python3 -c "import numpy, llama_cpp; llama_cpp.llama_backend_init(); p = llama_cpp.llama_model_default_params(); llama_cpp.llama_model_load_from_file(b'$model', p)" > "$out/backtrace.txt" 2>&1
e2d classify edge2dexit/models/sample_review.txt --json
timeout 300 python3 -c "import llama_cpp, sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', 'not gemma', 'tests/test_engine.py', 'tests/test_batching.py', 'tests/test_read_ahead.py', 'tests/test_imports.py']))" > "$out/gpu-tests.txt" 2>&1
timeout 120 e2d bench engine --rounds 7 > "$out/bench-engine.txt" 2>&1
if [ -n "$data" ]; then
  timeout 200 e2d bench throughput --data "$data" --docs 400 --widths 1,8,32,64 --extraction-docs 40 > "$out/throughput.txt" 2>&1
  DATA=$data timeout 90 python3 - > "$out/read-ahead.txt" 2>&1 <<'PY'
import llama_cpp, json, os, time
from edge2dexit import Classifier
from edge2dexit.settings import EngineSettings
rows = [json.loads(line) for line in open(os.environ["DATA"])]
texts = [row["text"] for row in rows]
for width in (1, 32):
    for ahead in (1, 64):
        with Classifier(settings=EngineSettings(width=width, min_decode_tokens=ahead), truncate=True) as clf:
            list(clf.classify_many(texts[:20]))
            started = time.perf_counter()
            out = dict(clf.classify_many(texts))
            seconds = time.perf_counter() - started
            accuracy = sum(out[i].label == rows[i]["label"] for i in out) / len(rows)
            print(f"prefix-mean width {width:2} read-ahead {ahead:2}: {len(texts) / seconds:7.1f} docs/s, accuracy {accuracy:.3f}")
PY
fi
tail -n 5 "$out"/*.txt
