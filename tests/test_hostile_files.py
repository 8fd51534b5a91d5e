"""Hostile files: a fuzzer that flips, overwrites and truncates bytes of the default exits.gguf (every case a
BundleError or a clean load whose policies all build, in bounded memory), crafted GGUF headers that claim absurd
sizes (refused before any large allocation), wrong architecture, unknown versions, sha256 mismatch, and paths that
are directories, unreadable, symlink loops or pipes: each one readable error with its exit code, never a traceback."""

from __future__ import annotations

import os
import struct
import tracemalloc
from collections import Counter

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from typer.testing import CliRunner

from edge2dexit.bundle import EXITS_FILE, MAX_ITEMS, load_bundle
from edge2dexit.classifier import DEFAULT_BUNDLE
from edge2dexit.cli import app
from edge2dexit.errors import BundleError, ModelError
from edge2dexit.keys import Keys
from edge2dexit.models.gguf_file import check_gguf
from edge2dexit.policies import make_policy
from helpers import rewrite

EXITS = DEFAULT_BUNDLE / EXITS_FILE
MiB = 1 << 20
# A clean load copies the heads (~5 MiB) out of the file; everything else gguf-py builds is small.
LOAD_PEAK = 64 * MiB
REFUSAL_PEAK = 4 * MiB


@pytest.fixture(scope="module", autouse=True)
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def peak_during(action) -> tuple[object, int]:
    """What `action()` returned or raised (as BundleError / ModelError), and the peak memory Python and numpy
    allocated meanwhile."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        value = action()
    except (BundleError, ModelError) as exc:
        value = exc
    return value, tracemalloc.get_traced_memory()[1] - before


# --- the fuzzer -----------------------------------------------------------------------------------------------

_WORDS = (2**60, 2**63, 2**64 - 1, 2**32, 10**12, 0, 1)


def mutate(data: bytes, header: int, rng: np.random.Generator) -> tuple[str, bytes]:
    """One damaged copy of an exits file, and how it was damaged. Most damage goes to the header (the first
    `header` bytes: keys, lengths, counts, types, offsets), where a reader is most easily misled."""
    kind = str(rng.choice(["flip", "extreme", "word", "data", "truncate"], p=[0.35, 0.15, 0.2, 0.1, 0.2]))
    b = bytearray(data)
    if kind == "flip":
        for pos in rng.integers(0, header, rng.integers(1, 9)):
            b[pos] ^= int(rng.integers(1, 256))
    elif kind == "extreme":
        for pos in rng.integers(0, header, rng.integers(1, 5)):
            b[pos] = int(rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF]))
    elif kind == "word":  # a length, count or offset (at any alignment) becomes absurd
        pos = int(rng.integers(0, header - 8))
        words = _WORDS + (len(data), len(data) + 1)
        b[pos : pos + 8] = struct.pack("<Q", words[rng.integers(len(words))])
    elif kind == "data":
        for pos in rng.integers(header, len(data), rng.integers(1, 9)):
            b[pos] ^= int(rng.integers(1, 256))
    else:
        end = header if rng.random() < 0.6 else len(data)
        del b[int(rng.integers(0, end)):]
    return kind, bytes(b)


def fuzz(cases: int, seed: int, directory) -> Counter:
    data = EXITS.read_bytes()
    header = GGUFReader(EXITS).data_offset
    rng = np.random.default_rng(seed)
    path = directory / EXITS_FILE
    counts: Counter = Counter()
    for case in range(cases):
        kind, damaged = mutate(data, header, rng)
        path.write_bytes(damaged)
        try:
            bundle, peak = peak_during(lambda: load_bundle(path))
            if not isinstance(bundle, BundleError):  # a clean load must be usable: every policy builds or says why
                for name, params in [*bundle.policies.items(), *bundle.llm_only_policies.items()]:
                    try:
                        make_policy(name, bundle.heads, bundle.base.n_layer, params)
                    except BundleError:
                        counts["loaded, a policy refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case} (seed {seed}, {kind}): {type(exc).__name__}: {exc}")
        assert peak < LOAD_PEAK, f"case {case} (seed {seed}, {kind}) allocated {peak / MiB:.0f} MiB"
        outcome = "refused" if isinstance(bundle, BundleError) else "loaded"
        counts[outcome] += 1
        counts[f"{kind} {outcome}"] += 1
    print(f"\nfuzz, seed {seed}: {dict(sorted(counts.items()))}")
    return counts


def test_fuzzed_exits_files_are_refused_or_load_cleanly(tmp_path):
    counts = fuzz(300, seed=11, directory=tmp_path)
    assert counts["refused"] + counts["loaded"] == 300 and counts["refused"] > 100


@pytest.mark.slow
def test_fuzz_soak(tmp_path):
    counts = fuzz(2_000, seed=2026, directory=tmp_path)
    assert counts["refused"] + counts["loaded"] == 2_000


# --- crafted headers --------------------------------------------------------------------------------------------


def gguf_string(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str, vtype: GGUFValueType, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def array(item: GGUFValueType, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", item, count) + payload


def tensor(name: str, dims: tuple[int, ...], ggml_type: int = GGMLQuantizationType.F32, offset: int = 0) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def gguf_file(kvs=(), tensors=(), version=3, n_kv=None, n_tensors=None, data=b"\0" * 64) -> bytes:
    """A GGUF file byte by byte: what GGUFWriter would never write."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


ARCH = kv("general.architecture", GGUFValueType.STRING, gguf_string("llama"))
HOSTILE = {
    "string of 2^60 bytes": (gguf_file([kv("general.name", GGUFValueType.STRING, gguf_string("x", 2**60))]),
                             "runs past the end of the file"),
    "key of 2^60 bytes": (gguf_file([gguf_string("k", 2**60)]), "runs past the end of the file"),
    "2^60 strings": (gguf_file([kv("tokens", GGUFValueType.ARRAY, array(GGUFValueType.STRING, 2**60))]),
                     "cannot fit in the file"),
    "2^60 integers": (gguf_file([kv("layers", GGUFValueType.ARRAY, array(GGUFValueType.UINT32, 2**60))]),
                      "runs past the end of the file"),
    "nested arrays": (gguf_file([kv("a", GGUFValueType.ARRAY, array(GGUFValueType.ARRAY, 1))]), "nested arrays"),
    "unknown value type": (gguf_file([kv("a", 99, b"")]), "unknown metadata value type 99"),
    "tensor of 10^12 elements": (gguf_file([ARCH], [tensor("t", (10**6, 10**6))]), "ends at byte 4000000000"),
    "tensor of 2^64 elements": (gguf_file([ARCH], [tensor("t", (2**32, 2**32))]), "but the file has"),
    "tensor data past the end": (gguf_file([ARCH], [tensor("t", (4,), offset=2**40)]), "but the file has"),
    "tensor of 5 dimensions": (gguf_file([ARCH], [tensor("t", (1, 1, 1, 1, 1))]), "claims 5 dimensions"),
    "tensor of unknown type": (gguf_file([ARCH], [tensor("t", (4,), ggml_type=999)]), "unknown type 999"),
    "alignment 0": (gguf_file([kv("general.alignment", GGUFValueType.UINT32, struct.pack("<I", 0))]),
                    "invalid alignment 0"),
    "2^60 keys": (gguf_file([ARCH], n_kv=2**60), "truncated or corrupt"),
    "2^60 tensors": (gguf_file([ARCH], n_tensors=2**60), "truncated or corrupt"),
    "GGUF version 4": (gguf_file([ARCH], version=4), "unsupported GGUF version 4"),
    "GGUF version 1": (gguf_file([ARCH], version=1), "unsupported GGUF version 1"),
    "big-endian GGUF": (gguf_file([ARCH], version=3 << 24), "unsupported GGUF version 50331648"),
    "only the magic": (b"GGUF", "truncated or corrupt"),
    "not GGUF": (b"\x7fELF" + bytes(60), "is not a GGUF file"),
    "key not UTF-8": (gguf_file([gguf_string(b"k\xff") + struct.pack("<IB", GGUFValueType.UINT8, 0)]),
                      "truncated or corrupt"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_crafted_headers_are_refused_before_any_large_allocation(tmp_path, name):
    content, words = HOSTILE[name]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(content)
    for error, load in ((BundleError, load_bundle), (ModelError, check_gguf)):  # as an exits file and as a model
        refusal, peak = peak_during(lambda: load(path))
        assert isinstance(refusal, error) and words in str(refusal), refusal
        assert peak < REFUSAL_PEAK, f"{peak / MiB:.1f} MiB"


def test_a_million_empty_strings_are_too_many_for_an_exits_file(tmp_path):
    """Each fits in 8 bytes, so the file is small (8 MB), but gguf-py's reader would build objects per string."""
    n = 1_000_000
    path = tmp_path / "many.gguf"
    path.write_bytes(gguf_file([kv("edge2dexit.labels", GGUFValueType.ARRAY,
                                   array(GGUFValueType.STRING, n, bytes(8 * n)))]))
    refusal, peak = peak_during(lambda: load_bundle(path))
    assert isinstance(refusal, BundleError) and f"more than the {MAX_ITEMS} expected" in str(refusal)
    assert peak < REFUSAL_PEAK
    assert check_gguf(path).n_kv == 1  # a base model may have such a vocabulary; llama.cpp reads it, not gguf-py


def test_a_string_that_is_not_utf8(tmp_path):
    """gguf-py decodes strings only when asked for their contents: a damaged label used to escape as a
    UnicodeDecodeError."""
    data = bytearray(EXITS.read_bytes())
    at = data.index(b"positive", data.index(Keys.Exits.LABELS.name.encode()))
    data[at] = 0xFF
    path = tmp_path / EXITS_FILE
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="a string in its metadata is not UTF-8"):
        load_bundle(path)


# --- paths ------------------------------------------------------------------------------------------------------


def hostile_path(tmp_path, kind: str):
    """A bundle path that is something other than a readable exits file or bundle directory."""
    if kind == "symlink loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        return tmp_path / "a"
    if kind == "loop inside a bundle":
        (tmp_path / EXITS_FILE).symlink_to(tmp_path / EXITS_FILE)
        return tmp_path
    if kind == "directory as exits file":
        (tmp_path / EXITS_FILE).mkdir()
        return tmp_path
    if kind == "pipe":
        os.mkfifo(tmp_path / "fifo")  # opening it would wait for a writer forever
        return tmp_path / "fifo"
    if kind == "dangling link":
        (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
        return tmp_path / "gone"
    raise ValueError(kind)


PATHS = {
    "symlink loop": "cannot be read (Too many levels of symbolic links)",
    "loop inside a bundle": "cannot be read (Too many levels of symbolic links)",
    "directory as exits file": "is not a file",
    "pipe": "is not a file",
    "dangling link": "bundle not found",
}


@pytest.mark.parametrize("kind", PATHS)
def test_hostile_paths_are_one_bundle_error(tmp_path, kind):
    path = hostile_path(tmp_path, kind)
    with pytest.raises(BundleError, match=PATHS[kind].replace("(", r"\(").replace(")", r"\)")):
        load_bundle(path)


@pytest.mark.parametrize("kind", ["symlink loop", "directory as exits file", "pipe", "dangling link"])
def test_hostile_model_paths_are_one_model_error(tmp_path, kind):
    path = hostile_path(tmp_path, kind)
    if kind == "directory as exits file":
        path = path / EXITS_FILE
    with pytest.raises(ModelError):
        check_gguf(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, whatever its mode")
def test_unreadable_paths(tmp_path):
    exits = tmp_path / "b" / EXITS_FILE
    exits.parent.mkdir()
    exits.write_bytes(EXITS.read_bytes())
    exits.chmod(0)
    with pytest.raises(BundleError, match="cannot be read"):
        load_bundle(exits.parent)
    exits.chmod(0o644)
    exits.parent.chmod(0)
    try:
        with pytest.raises(BundleError, match="cannot be read"):
            load_bundle(exits.parent)
    finally:
        exits.parent.chmod(0o755)


# --- through the CLI: one line, the documented exit code ------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink loop", "directory as exits file", "dangling link", "2^60 strings"])
def test_cli_hostile_bundle_exits_5_without_traceback(tmp_path, kind):
    review = tmp_path / "review.txt"
    review.write_text("A wonderful film.")
    if kind in HOSTILE:
        bundle = tmp_path / EXITS_FILE
        bundle.write_bytes(HOSTILE[kind][0])
    else:
        (tmp_path / "x").mkdir()
        bundle = hostile_path(tmp_path / "x", kind)
    result = CliRunner().invoke(app, ["classify", str(review), "--bundle", str(bundle)])
    assert result.exit_code == 5, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("kind", ["symlink loop", "2^60 strings", "exits file as model"])
def test_cli_hostile_model_exits_4_without_traceback(tmp_path, kind):
    review = tmp_path / "review.txt"
    review.write_text("A wonderful film.")
    if kind == "exits file as model":
        model = EXITS
    elif kind in HOSTILE:
        model = tmp_path / "model.gguf"
        model.write_bytes(HOSTILE[kind][0])
    else:
        model = hostile_path(tmp_path, kind)
    result = CliRunner().invoke(app, ["classify", str(review), "--model", str(model)])
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- a bundle for another model -----------------------------------------------------------------------------------


def test_wrong_architecture_and_sha256_mismatch(tmp_path, gemma_path, smollm2_path):
    from edge2dexit import Classifier, EngineSettings

    settings = EngineSettings(n_ctx=64)
    with pytest.raises(BundleError, match="bundle was built for llama .* but the model is gemma3"):
        Classifier(DEFAULT_BUNDLE, model=gemma_path, settings=settings)
    other = tmp_path / "b"
    other.mkdir()
    rewrite(EXITS, other / EXITS_FILE, {Keys.Exits.BASE_SHA256: ("0" * 64, GGUFValueType.STRING, None)})
    with pytest.raises(BundleError, match="sha256 00000000…"):
        Classifier(other, model=smollm2_path, settings=settings)
