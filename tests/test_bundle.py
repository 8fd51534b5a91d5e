import dataclasses
import json

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from edge2dexit import keys
from edge2dexit.bundle import BaseModelRef, Bundle, LoraRef, load_bundle, write_bundle, write_exits
from edge2dexit.errors import BundleError
from edge2dexit.keys import Keys
from edge2dexit.models.gguf_file import check_gguf

from helpers import D, SHA, make_bundle, rewrite

@pytest.fixture
def bundle():
    return make_bundle()


@pytest.fixture
def exits(bundle, tmp_path):
    return write_bundle(bundle, tmp_path / "b", half=False)


def assert_same_bundle(loaded, original, half):
    for f in dataclasses.fields(Bundle):
        if f.name not in ("heads", "directory"):
            assert getattr(loaded, f.name) == getattr(original, f.name), f.name
    assert list(loaded.heads) == list(original.heads)
    for pooling, heads in original.heads.items():
        got = loaded.heads[pooling]
        assert (got.pooling, got.labels, got.layers) == (heads.pooling, heads.labels, heads.layers)
        for layer, head in heads.heads.items():
            g = got.head(layer)
            assert g.kind == head.kind
            for a, b in [(g.norm_mean, head.norm_mean), (g.norm_scale, head.norm_scale)]:
                assert a.dtype == np.float32
                np.testing.assert_array_equal(a, b)
            for (gw, gb), (w, b) in zip(g.weights, head.weights):
                assert gw.dtype == (np.float16 if half else np.float32) and gb.dtype == np.float32
                np.testing.assert_array_equal(gw, w.astype(gw.dtype))
                np.testing.assert_array_equal(gb, b)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("half", [False, True])
def test_round_trip_every_key_and_tensor(tmp_path, kind, half):
    original = make_bundle(kind=kind, labels=("a", "b", "c"))
    path = write_bundle(original, tmp_path / "b", half=half)
    assert path == tmp_path / "b" / "exits.gguf"
    loaded = load_bundle(path.parent)
    assert loaded.directory == path.parent
    assert_same_bundle(loaded, original, half)
    # Writing what was read gives the same bytes: no key or tensor is lost, added or altered.
    again = write_exits(loaded, tmp_path / "again.gguf", half=half)
    assert again.read_bytes() == path.read_bytes()


def test_file_layout(exits):
    reader = GGUFReader(exits)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields[Keys.General.TYPE.name] == "adapter" and fields[Keys.Adapter.TYPE.name] == "edge2dexit"
    assert fields[Keys.General.ARCHITECTURE.name] == "llama"
    assert fields[Keys.Exits.FORMAT_VERSION.name] == keys.FORMAT_VERSION == 6
    assert fields[Keys.Exits.LORA_FILE.name] == "" and fields[Keys.Exits.LEXICAL_ANALYZER.name] == ""  # none: empty
    assert json.loads(fields[Keys.Exits.SCALES.name])["exits"]["prefix"]["4"] == {"alone": [0.0] * 6, "fused": None}
    assert json.loads(fields[Keys.Exits.TRUST.name]) == {}
    assert fields["edge2dexit.sentence.exit_layers"] == [1, 3, 5]
    assert Keys.exit_layers("prefix").name == "edge2dexit.prefix.exit_layers"
    assert reader.fields[Keys.exit_layers("prefix").name].types == [GGUFValueType.ARRAY, GGUFValueType.UINT32]
    assert fields["edge2dexit.policy.full"] == "{}"
    assert fields[Keys.policy("prefix-mean").name] == '{"layer": 4, "threshold": 0.25, "min_sentences": 3}'
    for key in (Keys.Exits.LABELS, Keys.Exits.BASE_BLOCK_COUNT, Keys.Exits.TASK_PROMPT, Keys.exit_layers("sentence")):
        assert reader.fields[key.name].types == [key.type] + ([key.item] if key.item is not None else []), key
    names = {t.name for t in reader.tensors}
    assert {"exit.sentence.3.norm_mean", "exit.sentence.3.norm_scale", "exit.sentence.3.fc1.weight",
            "exit.sentence.3.fc1.bias", "exit.prefix.4.fc2.weight", "exit.prefix.4.fc2.bias"} <= names
    assert len(names) == 5 * 6
    assert next(t for t in reader.tensors if t.name == "exit.sentence.3.fc1.weight").data.shape == (8, D)


def test_empty_strings_survive(tmp_path):
    b = dataclasses.replace(make_bundle(), base=BaseModelRef("", SHA, "llama", 6, D), task_prompt="", calibration={})
    loaded = load_bundle(write_exits(b, tmp_path / "x.gguf"))
    assert (loaded.base.name, loaded.task_prompt, loaded.calibration) == ("", "", {})


def test_model_file_and_policy_params(exits, bundle):
    loaded = load_bundle(exits)
    assert loaded.model_file is None
    (exits.parent / "model.gguf").write_bytes(b"stand-in")
    assert loaded.model_file == exits.parent / "model.gguf"
    assert loaded.policy_params("prefix-mean") == {"layer": 4, "threshold": 0.25, "min_sentences": 3}
    with pytest.raises(BundleError, match="no policy 'fast'; it has prefix-mean, full"):
        loaded.policy_params("fast")


def test_check_base(bundle):
    bundle.check_base(SHA.upper(), "llama", 6, D)
    with pytest.raises(BundleError) as err:
        bundle.check_base("b179c952" + "1" * 56, "gemma3", 18, 640)
    assert str(err.value).startswith("bundle was built for llama (6 layers, 16-dim, sha256 a5fd3b62…) "
                                     "but the model is gemma3 (18 layers, 640-dim, sha256 b179c952…)")


def test_writer_refuses_what_the_loader_would(tmp_path, bundle):
    bundle.default_policy = "missing"
    with pytest.raises(BundleError, match="default policy 'missing' is not among the bundle's policies"):
        write_bundle(bundle, tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- refusals -------------------------------------------------------------------------------------------------------

def refused(path, *words):
    with pytest.raises(BundleError) as err:
        load_bundle(path)
    message = str(err.value)
    for w in words:
        assert w in message, message
    return message


def test_not_a_bundle(tmp_path):
    refused(tmp_path / "nowhere", "bundle not found", "nowhere")
    refused(tmp_path, "is not a bundle: it has no exits.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    refused(text, "notes.gguf is not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    refused(empty, "not a GGUF file")


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.05, 0.2, 0.5, 0.8, 0.99, 1.0])
def test_truncated(exits, tmp_path, fraction):
    data = exits.read_bytes()
    data_end = check_gguf(exits).data_end  # what follows is alignment padding, which no reader needs
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:max(8, min(int(len(data) * fraction), data_end - 1))])
    refused(cut, "cut.gguf is truncated or corrupt")


def test_corrupt_header(exits):
    data = bytearray(exits.read_bytes())
    data[8:16] = (10**9).to_bytes(8, "little")  # tensor count
    exits.write_bytes(bytes(data))
    refused(exits, "truncated or corrupt")


def test_other_adapter_and_plain_model(exits, tmp_path):
    lora = rewrite(exits, tmp_path / "lora.gguf", {Keys.Adapter.TYPE: ("lora", GGUFValueType.STRING, None)})
    refused(lora, "not an edge2dexit exits file (adapter.type = 'lora'")
    model = tmp_path / "model.gguf"
    writer = GGUFWriter(model, arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    refused(model, "not an edge2dexit exits file (general.type = None, expected 'adapter')")


def set_format_version(exits, version):
    reader = GGUFReader(exits, "r+")  # edit the key in place
    reader.fields[Keys.Exits.FORMAT_VERSION.name].parts[-1][0] = version
    reader.data.flush()
    del reader


def test_format_version(exits):
    set_format_version(exits, keys.FORMAT_VERSION + 1)
    refused(exits, f"format version {keys.FORMAT_VERSION + 1}", "upgrade edge2dexit")
    for old in (5, 4, 1, 0):  # every older format: its probabilities were never calibrated
        set_format_version(exits, old)
        refused(exits, f"format version {old} by an older edge2dexit", "convert the bundle again", "--reuse")
    set_format_version(exits, keys.FORMAT_VERSION)
    assert load_bundle(exits).default_policy == "prefix-mean"


@pytest.mark.parametrize("key", [Keys.Exits.LORA_FILE, Keys.Exits.LEXICAL_ANALYZER, Keys.Exits.LEXICAL_THRESHOLDS,
                                 Keys.Exits.LLM_ONLY_POLICIES, Keys.Exits.SCALES, Keys.Exits.TRUST],
                         ids=lambda k: k.name)
def test_every_key_is_needed_even_where_empty(exits, tmp_path, key):
    """A part a bundle lacks is an empty key, never a missing one: a key lost to damage cannot pass for it."""
    refused(rewrite(exits, tmp_path / "damaged.gguf", drop=[key]), f"missing key {key.name}")


def test_lora_reference_round_trips_and_is_checked(tmp_path):
    lora = LoraRef("lora.gguf", "b" * 64)
    original = dataclasses.replace(make_bundle(), lora=lora)
    path = write_bundle(original, tmp_path / "b")
    loaded = load_bundle(path)
    assert loaded.lora == lora
    with pytest.raises(BundleError, match="needs its LoRA adapter lora.gguf"):
        loaded.lora_file()
    (path.parent / "lora.gguf").write_bytes(b"not the adapter")
    with pytest.raises(BundleError, match="not the LoRA adapter the heads were trained with"):
        loaded.lora_file()
    for name in ("../lora.gguf", "/tmp/lora.gguf", "lora.bin", "exits.gguf", "model.gguf"):
        with pytest.raises(BundleError, match="must be a bare"):
            dataclasses.replace(original, lora=LoraRef(name, "b" * 64))


def test_default_bundle_carries_the_lexical_exit_scales_and_trust_for_both_readings():
    from edge2dexit.classifier import DEFAULT_BUNDLE
    from edge2dexit.policies import policy_names

    reader = GGUFReader(DEFAULT_BUNDLE / "exits.gguf")
    assert reader.fields[Keys.Exits.FORMAT_VERSION.name].contents() == keys.FORMAT_VERSION
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert set(bundle.policies) == set(policy_names()) and bundle.default_policy == "prefix-mean"
    assert bundle.lexical is not None and set(bundle.lexical_thresholds) == set(bundle.policies)
    assert bundle.scales.words is not None and set(bundle.scales.exits) == set(bundle.heads)
    assert set(bundle.trust) == {"behind the words", "alone"}
    assert all(t.policy == "prefix-mean" for t in bundle.trust.values())
    assert set(bundle.policies["prefix-mean"]) >= {"layer", "threshold", "min_sentences"}


def test_a_trust_record_is_refused_for_any_other_reading_than_the_one_it_was_calibrated_for(tmp_path):
    """The promise of `--max-error` is about the reading it was certified on: parameters changed after calibration
    (another stop threshold, another lexical threshold) leave a bundle that neither writes nor loads."""
    import dataclasses

    from edge2dexit.classifier import DEFAULT_BUNDLE

    bundle = load_bundle(DEFAULT_BUNDLE)
    policies = {**bundle.policies, "prefix-mean": {**bundle.policies["prefix-mean"], "threshold": 0.99}}
    with pytest.raises(BundleError, match=r"trust record \((alone|behind the words)\) was calibrated for"):
        dataclasses.replace(bundle, policies=policies, llm_only_policies={**bundle.llm_only_policies,
                                                                          "prefix-mean": policies["prefix-mean"]})
    with pytest.raises(BundleError, match=r"trust record \(behind the words\) was calibrated for"):
        dataclasses.replace(bundle, lexical_thresholds={**bundle.lexical_thresholds, "prefix-mean": 0.99})


@pytest.mark.parametrize("key", [Keys.Exits.LABELS, Keys.Exits.BASE_SHA256, Keys.Exits.FORMAT_VERSION,
                                 Keys.exit_layers("prefix"), Keys.Exits.CALIBRATION], ids=lambda k: k.name)
def test_missing_key(exits, tmp_path, key):
    refused(rewrite(exits, tmp_path / "x.gguf", drop=[key]), f"missing key {key.name}")


def test_wrong_key_type(exits, tmp_path):
    bad = rewrite(exits, tmp_path / "x.gguf", {Keys.Exits.BASE_BLOCK_COUNT: (6, GGUFValueType.INT32, None)})
    refused(bad, "key edge2dexit.base.block_count is INT32, expected UINT32")


def test_labels_not_matching_heads(exits, tmp_path):
    labels = (["a", "b", "c"], GGUFValueType.ARRAY, GGUFValueType.STRING)
    bad = rewrite(exits, tmp_path / "x.gguf", {Keys.Exits.LABELS: labels})
    refused(bad, "x.gguf: bundle has 3 labels but the exit head for layer 1 outputs 2 classes")


def test_heads_not_matching_embedding_length(exits, tmp_path):
    bad = rewrite(exits, tmp_path / "x.gguf", {Keys.Exits.BASE_EMBEDDING_LENGTH: (32, GGUFValueType.UINT32, None)})
    refused(bad, "exit heads read 16-dim states but the base model's embedding length is 32")


def test_exit_layer_beyond_depth(exits, tmp_path):
    bad = rewrite(exits, tmp_path / "x.gguf", {Keys.Exits.BASE_BLOCK_COUNT: (5, GGUFValueType.UINT32, None)})
    refused(bad, "exit head for layer 5 but the base model has only 5 layers")


def test_policy_not_json(exits, tmp_path):
    key = Keys.policy("prefix-mean")
    bad = rewrite(exits, tmp_path / "x.gguf", {key: ("{tau: 0.3", GGUFValueType.STRING, None)})
    refused(bad, "key edge2dexit.policy.prefix-mean is not valid JSON")
    bad = rewrite(exits, tmp_path / "y.gguf", {key: ("[0.3]", GGUFValueType.STRING, None)})
    refused(bad, "key edge2dexit.policy.prefix-mean must hold a JSON object")


def test_default_policy_unknown(exits, tmp_path):
    bad = rewrite(exits, tmp_path / "x.gguf", {Keys.Exits.DEFAULT_POLICY: ("paper2d", GGUFValueType.STRING, None)})
    refused(bad, "default policy 'paper2d' is not among the bundle's policies (prefix-mean, full)")


def test_missing_and_stray_tensors(exits, tmp_path):
    bad = rewrite(exits, tmp_path / "x.gguf", drop=["exit.prefix.4.fc1.bias"])
    refused(bad, "missing tensor exit.prefix.4.fc1.bias")
    tensors = {t.name: np.array(t.data) for t in GGUFReader(exits).tensors}
    tensors["exit.prefix.9.fc.weight"] = np.zeros((2, D), np.float32)
    refused(rewrite(exits, tmp_path / "y.gguf", tensors=tensors), "belong to no exit head", "exit.prefix.9.fc.weight")
    tensors.pop("exit.prefix.9.fc.weight")
    tensors["exit.sentence.1.norm_scale"] = tensors["exit.sentence.1.norm_scale"].astype(np.float16)
    refused(rewrite(exits, tmp_path / "z.gguf", tensors=tensors), "exit.sentence.1.norm_scale is F16; expected F32")


def test_unknown_splitter_and_head_kind(exits, tmp_path):
    bad = rewrite(exits, tmp_path / "x.gguf", {Keys.Exits.SPLITTER_KIND: ("spacy", GGUFValueType.STRING, None)})
    refused(bad, "unknown sentence splitter 'spacy'")
    bad = rewrite(exits, tmp_path / "y.gguf", {Keys.Exits.HEAD_KIND: ("linear", GGUFValueType.STRING, None)})
    refused(bad, "missing tensor exit.sentence.1.fc.weight")
