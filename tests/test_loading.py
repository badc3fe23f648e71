"""model/loading.py on checkpoints built the way users hold them: written by transformers' own
save_pretrained (sharded by size), CLIP towers saved as CLIPVisionModel or CLIPModel, and the
damaged or mistyped files that users send. Parity is checked against transformers' logits
(tiny.assert_same_logits); every error must name the file and the key or field. Also save_model's
round trip and resolve_dtype's names."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
from harness.cli import UserError, run_main
from model import CheckpointError, load_model, save_model
from model.loading import MODEL_TYPE_DEFAULTS, config_from_json, resolve_dtype
from test_model import hf_models, loaded  # noqa: F401 (fixtures)

pytest.importorskip("transformers")  # the reference; listed in requirements-test.txt, so never skipped in CI


@pytest.fixture(scope="module")
def hf():
    return tiny.hf_tiny_llava("mistral", "default", seed=4)


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    """hf.save_pretrained with a 10 KB shard limit: transformers writes 32 shards, among them one
    holding only `language_model.lm_head.weight`, one only projector keys, and tower-only ones."""
    out = tmp_path_factory.mktemp("saved")
    hf.save_pretrained(out, max_shard_size="10KB")
    return out


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "ck")


def _parts_by_shard(ckpt) -> dict[str, set[str]]:
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    parts: dict[str, set[str]] = {}
    for key, file in weight_map.items():
        part = "lm_head" if "lm_head" in key else key.split(".")[0]
        parts.setdefault(file, set()).add(part)
    return parts


# --- layouts decided over the whole checkpoint ---------------------------------------------------


def test_transformers_sharded_save_loads(hf, saved):
    """The user's failing case: shards holding one part only (no key in them tells the layout)."""
    parts = list(_parts_by_shard(saved).values())
    for only in ({"lm_head"}, {"multi_modal_projector"}, {"vision_tower"}):
        assert only in parts  # else the fixture no longer builds the case this test is about
    tiny.assert_same_logits(load_model(saved), hf)


@pytest.mark.parametrize("index", [True, False])
def test_lm_head_alone_in_a_shard_of_the_new_layout(hf, tmp_path, index):
    """`lm_head.weight` is written by both LLaVA-Med and llava-hf: a shard holding only it is
    placed by the other shards' keys, with or without an index file."""
    ckpt = tiny.save_layout(hf, tmp_path / "ck", "llava-hf")
    shards = tiny.reshard(ckpt, lambda k: "head.safetensors" if k.startswith("lm_head.") else "body.safetensors",
                          index=index)
    assert shards["head.safetensors"] == ["lm_head.weight"]
    tiny.assert_same_logits(load_model(ckpt), hf)


def test_unrecognised_layout_names_files_and_keys(hf, tmp_path):
    ckpt = tiny.save_layout(hf, tmp_path / "ck", "llava-hf")
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file({"transformer." + k: v for k, v in sd.items()}, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"ck: unrecognised key layout.*transformer\.\S+ \(model\.safetensors\)"):
        load_model(ckpt)


def test_two_layouts_in_one_checkpoint_named(hf, tmp_path):
    """A shard from a llava-hf save next to a shard of the legacy layout: both keys and files named."""
    ckpt = tiny.save_layout(hf, tmp_path / "ck", "llava-hf")
    tiny.reshard(ckpt, lambda k: "a.safetensors" if k.startswith("model.vision_tower.") else "b.safetensors")
    sd = load_file(str(ckpt / "a.safetensors"))
    save_file({k[len("model."):]: v for k, v in sd.items()}, str(ckpt / "a.safetensors"))  # legacy 5.x tower keys
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k[len("model."):] if f == "a.safetensors" else k: f for k, f in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "2 layouts" in msg and "(a.safetensors) is llava-hf-legacy" in msg and "(b.safetensors) is llava-hf" in msg


# --- duplicates ------------------------------------------------------------------------------------


def test_duplicate_key_across_files_is_an_error(hf, tmp_path):
    """A stray partial file of zeros beside the real weights: without the check, whichever file
    came later in name order would win silently."""
    ckpt = tiny.save_layout(hf, tmp_path / "ck", "llava-hf-legacy")
    stray = {"language_model.model.norm.weight": torch.zeros(64), "multi_modal_projector.linear_1.bias": torch.zeros(64)}
    save_file(stray, str(ckpt / "zz-partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"ck: tensors stored twice.*model\.safetensors and zz-partial\.safetensors "
                                              r"both hold language_model\.model\.norm\.weight \(and 1 more keys\)"):
        load_model(ckpt)


def test_one_parameter_under_two_keys_is_an_error(hf, tmp_path):
    """transformers 4.x (`vision_tower.vision_model.*`) and 5.x (`vision_tower.*`) names of one
    tower weight in one checkpoint: both keys, both files and the parameter are named."""
    ckpt = tiny.save_layout(hf, tmp_path / "ck", "llava-hf-legacy")
    save_file({"vision_tower.vision_model.pre_layrnorm.weight": torch.ones(32)}, str(ckpt / "old.safetensors"))
    with pytest.raises(CheckpointError, match=r"vision_tower\.pre_layrnorm\.weight \(model\.safetensors\) and "
                                              r"vision_tower\.vision_model\.pre_layrnorm\.weight \(old\.safetensors\) "
                                              r"are both vision_tower\.pre_layrnorm\.weight"):
        load_model(ckpt)


# --- CLIP directories as vision_tower= ------------------------------------------------------------


@pytest.fixture(scope="module")
def med_without_tower(hf, tmp_path_factory):
    """A LLaVA-Med checkpoint that leaves the tower to a CLIP directory, as distributed."""
    ckpt = tiny.save_layout(hf, tmp_path_factory.mktemp("med") / "ck", "llava-med")
    sd = load_file(str(ckpt / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if "vision_tower" not in k}, str(ckpt / "model.safetensors"))
    return ckpt


def _save_clip(hf, kind, out):
    if kind == "CLIPVisionModel":  # transformers 5 writes bare `embeddings.*`, `encoder.*` keys
        hf.model.vision_tower.save_pretrained(out)
    else:  # `vision_model.*` keys beside the text tower and projections, which must be skipped
        tiny.hf_clip_model(hf).save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["CLIPVisionModel", "CLIPModel"])
def test_clip_directories_as_vision_tower(hf, med_without_tower, tmp_path, kind):
    clip = _save_clip(hf, kind, tmp_path / "clip")
    with safe_open(str(clip / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    bare = kind == "CLIPVisionModel"
    assert any(k.startswith("embeddings.") for k in keys) == bare
    assert any(k.startswith("text_model.") for k in keys) != bare
    tiny.assert_same_logits(load_model(med_without_tower, vision_tower=clip), hf)


def test_clip_directory_replaces_the_stored_tower(hf, saved, tmp_path):
    """vision_tower= overrides a tower the checkpoint holds: a tower of zeros in the checkpoint
    would change the logits if it were the one read."""
    ckpt = _copy(saved, tmp_path)
    for file in ckpt.glob("*.safetensors"):
        sd = load_file(str(file))
        if any(k.startswith("vision_tower.") for k in sd):
            save_file({k: torch.zeros_like(v) if k.startswith("vision_tower.") else v for k, v in sd.items()}, str(file))
    clip = _save_clip(hf, "CLIPVisionModel", tmp_path / "clip")
    tiny.assert_same_logits(load_model(ckpt, vision_tower=clip), hf)


def test_clip_directory_unknown_key_named(hf, med_without_tower, tmp_path):
    clip = _save_clip(hf, "CLIPVisionModel", tmp_path / "clip")
    sd = load_file(str(clip / "model.safetensors"))
    sd["head.weight"] = torch.zeros(2)
    save_file(sd, str(clip / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected: head\.weight \(model\.safetensors\)"):
        load_model(med_without_tower, vision_tower=clip)


# --- config.json --------------------------------------------------------------------------------


def _set(path: str, value):
    """An edit of config.json setting the field at the dotted `path` (None value: delete it)."""
    def edit(c):
        *outer, last = path.split(".")
        for key in outer:
            c = c[key]
        if value is None:
            del c[last]
        else:
            c[last] = value
    return edit


# (edit of the saved config.json, exact message after "<dir>/config.json: ")
BAD_CONFIGS = {
    "string size": (_set("text_config.hidden_size", "256"), 'text_config.hidden_size must be an integer, got "256"'),
    "float size": (_set("vision_config.num_hidden_layers", 2.5), "vision_config.num_hidden_layers must be an integer, got 2.5"),
    "bool size": (_set("text_config.vocab_size", True), "text_config.vocab_size must be an integer, got true"),
    "zero size": (_set("text_config.intermediate_size", 0), "text_config.intermediate_size must be at least 1, got 0"),
    "string eps": (_set("text_config.rms_norm_eps", "1e-5"), 'text_config.rms_norm_eps must be a number, got "1e-5"'),
    "nan eps": (_set("vision_config.layer_norm_eps", float("nan")), "vision_config.layer_norm_eps must be a number, got NaN"),
    "rope type": (_set("text_config.rope_parameters.rope_type", "yarn"),
                  'text_config.rope_parameters.rope_type is "yarn"; only plain RoPE is supported: "default"'),
    "strategy": (_set("vision_feature_select_strategy", "cls"),
                 'vision_feature_select_strategy is "cls"; supported: "default", "full"'),
    "layer list": (_set("vision_feature_layer", [-2, -5]), "vision_feature_layer is [-2, -5]: only a single layer is supported"),
    "layer range": (_set("vision_feature_layer", -5), "vision_feature_layer -5 is outside the 4 hidden states of the vision tower"),
    "bias": (_set("multimodal_projector_bias", "yes"), 'multimodal_projector_bias must be true or false, got "yes"'),
    "kv heads": (_set("text_config.num_key_value_heads", 3), "text_config.num_key_value_heads 3 does not divide num_attention_heads 4"),
    "patch": (_set("vision_config.patch_size", 5), "vision_config.patch_size 5 does not divide image_size 28"),
    "text act": (_set("text_config.hidden_act", "gelu"), 'text_config.hidden_act is "gelu"; LLaMA / Mistral use: "silu"'),
    "null section": (_set("text_config", 0), "text_config must be a JSON object, got 0"),
    # Without a model_type, transformers' defaults are unknown: a left-out field is missing.
    "missing": (lambda c: [c["text_config"].pop(k) for k in ("model_type", "num_hidden_layers")],
                "missing field text_config.num_hidden_layers"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_names_file_and_field(saved, tmp_path, case):
    edit, message = BAD_CONFIGS[case]
    ckpt = _copy(saved, tmp_path)
    c = json.loads((ckpt / "config.json").read_text())
    edit(c)
    (ckpt / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert str(e.value) == f"{ckpt / 'config.json'}: {message}"


def test_llava_med_config_missing_field(med_without_tower, hf, tmp_path):
    """LLaVA-Med's flat config has no sub-config model_type to take defaults from."""
    ckpt = shutil.copytree(med_without_tower, tmp_path / "ck")
    c = json.loads((ckpt / "config.json").read_text())
    clip = _save_clip(hf, "CLIPVisionModel", tmp_path / "clip")
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in c.items() if k != "num_attention_heads"}))
    with pytest.raises(CheckpointError, match=r"ck/config\.json: missing field num_attention_heads$"):
        load_model(ckpt, vision_tower=clip)
    (ckpt / "config.json").write_text(json.dumps({**c, "mm_projector_type": "mlp3x_gelu"}))
    with pytest.raises(CheckpointError, match=r'ck/config\.json: mm_projector_type is "mlp3x_gelu"; supported'):
        load_model(ckpt, vision_tower=clip)


def test_config_not_utf8_names_file_and_byte(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    data = (ckpt / "config.json").read_bytes()
    at = data.index(b'"llava"') + 1
    (ckpt / "config.json").write_bytes(data[:at] + b"\xff" + data[at:])  # inside the model_type string
    with pytest.raises(CheckpointError, match=rf"ck/config\.json: not UTF-8 text \(byte 0xff at offset {at}\)"):
        load_model(ckpt)


def test_config_not_an_object(saved, tmp_path):
    ckpt = _copy(saved, tmp_path)
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"ck/config\.json: the file must be a JSON object, got \[1, 2\]"):
        load_model(ckpt)


def test_bad_clip_config_names_its_file(med_without_tower, hf, tmp_path):
    clip = _save_clip(hf, "CLIPModel", tmp_path / "clip")
    c = json.loads((clip / "config.json").read_text())
    c["vision_config"]["hidden_size"] = "32"
    (clip / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match=r'clip/config\.json: vision_config\.hidden_size must be an integer, got "32"'):
        load_model(med_without_tower, vision_tower=clip)


def test_integer_weight_names_file_and_key(saved, tmp_path):
    """An int64 RMSNorm weight: an error naming the shard and the key, not a RuntimeError."""
    ckpt = _copy(saved, tmp_path)
    key = "language_model.model.norm.weight"
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][key]
    sd = load_file(str(shard))
    sd[key] = torch.ones_like(sd[key], dtype=torch.int64)
    save_file(sd, str(shard))
    with pytest.raises(CheckpointError, match=rf"1 not floating point where a weight belongs: "
                                              rf"{key} \({shard.name}\) is I64"):
        load_model(ckpt)


# --- defaults of sub-configs that leave fields out -----------------------------------------------


@pytest.mark.parametrize("model_type", list(MODEL_TYPE_DEFAULTS))
def test_model_type_defaults_are_transformers(model_type):
    """The defaults used for left-out fields are those of transformers' config classes."""
    from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig

    ref = {"llama": LlamaConfig, "mistral": MistralConfig, "clip_vision_model": CLIPVisionConfig}[model_type]()
    for field, value in MODEL_TYPE_DEFAULTS[model_type].items():
        got = ref.rope_parameters["rope_theta"] if field == "rope_theta" else getattr(ref, field)
        assert got == value, field


@pytest.mark.parametrize("text", ["llama", "mistral"])
def test_sub_config_with_default_fields_left_out(text):
    """transformers 4.x writes only the non-default fields of text_config / vision_config (e.g.
    llava-hf/llava-1.5-7b-hf has no text_config.hidden_size): such a file reads as the full one."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, MistralConfig

    text_cls = {"llama": LlamaConfig, "mistral": MistralConfig}[text]
    full = LlavaConfig(text_config=text_cls(), vision_config=CLIPVisionConfig(image_size=336, patch_size=14)).to_dict()
    short = json.loads(json.dumps(full, default=str))
    for section, cls in (("text_config", text_cls), ("vision_config", CLIPVisionConfig)):
        default = cls().to_dict()
        short[section] = {k: v for k, v in short[section].items() if k == "model_type" or v != default.get(k)}
    assert "hidden_size" not in short["text_config"] and "hidden_size" not in short["vision_config"]
    assert config_from_json(short) == config_from_json(full)


def test_image_token_index_vocabulary_id_or_llava_minus_200():
    """save_model writes image_token_index -200 for models on LLaVA-Med's convention (the id is
    outside the vocabulary); any other negative id is an error naming the field."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    c = LlavaConfig(text_config=LlamaConfig(), vision_config=CLIPVisionConfig()).to_dict()
    c = json.loads(json.dumps(c, default=str))
    for ok in (32000, -200):
        c["image_token_index"] = ok
        assert config_from_json(c).image_token_id == ok
    c["image_token_index"] = -5
    with pytest.raises(CheckpointError, match="image_token_index must be a token id >= 0 or LLaVA's -200, got -5"):
        config_from_json(c, source="ckpt/config.json")


# --- one line from the scripts -------------------------------------------------------------------


def test_checkpoint_error_is_a_user_error(saved, tmp_path, capsys):
    ckpt = _copy(saved, tmp_path)
    c = json.loads((ckpt / "config.json").read_text())
    c["text_config"]["hidden_size"] = "256"
    (ckpt / "config.json").write_text(json.dumps(c))
    assert issubclass(CheckpointError, UserError) and issubclass(CheckpointError, ValueError)
    assert run_main(lambda argv: load_model(ckpt), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'text_config.hidden_size must be an integer, got "256"' in err


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda:1") is torch.bfloat16
    assert resolve_dtype("auto", "cuda", gpu_default="float16") is torch.float16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64", "cpu")


def test_save_model_round_trip(loaded, tmp_path):
    _, model = loaded
    again = load_model(save_model(model, tmp_path / "out"))
    ids, mask, pixels = tiny.batch_inputs()
    assert torch.equal(again(ids, pixels, mask), model(ids, pixels, mask))


# --- loading errors -----------------------------------------------------------------------------


@pytest.fixture()
def ckpt(hf_models, tmp_path):
    return tiny.save_layout(hf_models[("llama", "default")], tmp_path / "ck", "llava-hf-legacy")


def _edit(ckpt, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(ckpt / "model.safetensors"))
    fn(sd)
    save_file(sd, str(ckpt / "model.safetensors"))


def test_missing_key_is_named(ckpt):
    _edit(ckpt, lambda sd: sd.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing.*language_model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ckpt)


def test_unexpected_key_is_named(ckpt):
    _edit(ckpt, lambda sd: sd.__setitem__("language_model.model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"1 unexpected.*layers\.0\.extra\.weight \(model\.safetensors\)"):
        load_model(ckpt)


def test_wrong_shape_is_named(ckpt):
    _edit(ckpt, lambda sd: sd.__setitem__("multi_modal_projector.linear_2.weight", torch.zeros(64, 63)))
    with pytest.raises(CheckpointError, match=r"wrong shape.*linear_2\.weight.*\(64, 63\) in the file, \(64, 64\) expected"):
        load_model(ckpt)


def test_all_problems_in_one_error(ckpt):
    def damage(sd):
        sd.pop("language_model.lm_head.weight")
        sd["stray.weight"] = torch.zeros(1)
    _edit(ckpt, damage)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert "lm_head.weight" in str(e.value) and "stray.weight" in str(e.value)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(ckpt)


def test_pickle_checkpoint_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"(?s)pytorch_model\.bin.*never unpickles.*save_file"):
        load_model(ckpt)


def _med_naming_vit_l(hf, out, *, tower: bool):
    """A LLaVA-Med checkpoint whose config names OpenAI's ViT-L/14-336 (width 1024) and holds the
    tiny tower (width 32), or no tower."""
    ck = tiny.save_layout(hf, out, "llava-med")
    config = json.loads((ck / "config.json").read_text())
    config["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ck / "config.json").write_text(json.dumps(config))
    if not tower:
        _edit(ck, lambda sd: [sd.pop(k) for k in list(sd) if "vision_tower" in k])
    return ck


def test_missing_tower_hint(hf_models, tmp_path):
    hf = hf_models[("llama", "default")]
    ck = tiny.save_layout(hf, tmp_path / "med", "llava-med")
    _edit(ck, lambda sd: [sd.pop(k) for k in list(sd) if "vision_tower" in k])
    with pytest.raises(CheckpointError, match='"tiny-clip.*pass --vision-tower <CLIP directory>$'):
        load_model(ck)  # the config names a tower whose shape is unknown
    with pytest.raises(CheckpointError, match=r"no vision tower: pass --vision-tower <CLIP directory>\n"):
        load_model(_med_naming_vit_l(hf, tmp_path / "vit-l", tower=False))  # one it knows, not in the file
    clip = tiny.save_clip_dir(hf, tmp_path / "clip")
    _edit(clip, lambda sd: sd.pop("vision_model.pre_layrnorm.weight"))
    with pytest.raises(CheckpointError, match=r"med:\n  1 missing: vision_tower\.pre_layrnorm\.weight$"):
        load_model(ck, vision_tower=clip)  # the tower is there, one key short: no advice


def test_tower_of_another_width_is_said_in_words(hf_models, tmp_path):
    """Issue #26 item 5: a tiny tower under a config naming ViT-L was 336 missing keys and 56 shapes
    (26 KB) after advice to pass a tower it has. Now: the widths in words, the flag, and each list
    cut to three keys and a count."""
    ck = _med_naming_vit_l(hf_models[("llama", "default")], tmp_path / "med", tower=True)
    with pytest.raises(CheckpointError) as e:
        load_model(ck)
    lines = str(e.value).split("\n")
    assert lines[0] == (f"cannot load {ck}: the vision tower in the checkpoint has width 32 where "
                        'mm_vision_tower "openai/clip-vit-large-patch14-336" implies 1024: '
                        "pass --vision-tower <the CLIP directory it was trained with>")
    assert lines[1].startswith("  336 missing: vision_tower.encoder.layers.10.")
    assert lines[1].endswith(", and 333 more")
    assert lines[2].startswith("  56 with the wrong shape: ") and lines[2].endswith("; and 53 more")
    assert len(lines) == 3 and lines[1].count("vision_tower.") == lines[2].count(" expected") == 3


@pytest.mark.parametrize("layers", [2, 5])
def test_tower_of_another_depth_is_said_in_words(ckpt, layers):
    """A tower of the config's width but another layer count (the file's has 3) is said in words too,
    not only as keys missing or unexpected."""
    config = json.loads((ckpt / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = layers
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    assert str(e.value).split("\n")[0] == (
        f"cannot load {ckpt}: the vision tower in the checkpoint has 3 layers where vision_config.num_hidden_layers "
        f"implies {layers}: pass --vision-tower <the CLIP directory it was trained with>")


def test_non_finite_weights_are_refused_naming_file_and_tensor(ckpt):
    """Issue #24 item 1: one NaN, one +Inf, or 4 KiB of 0xFF in the middle of the file (NaN once
    decoded: safetensors has no checksum) loaded silently. Now each is an error naming the file and
    the tensors; check_finite=False (--no-check-finite) still loads them."""
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    k = "language_model.model.layers.1.mlp.up_proj.weight"

    def poison(sd):
        sd[q][3, 5], sd[k][0, 0] = float("nan"), float("inf")
    _edit(ckpt, poison)
    with pytest.raises(CheckpointError, match=rf"cannot load {ckpt}: 2 of \d+ tensors hold NaN or Inf .*: "
                                              rf"{q} \(model\.safetensors\), {k} \(model\.safetensors\); "
                                              "--no-check-finite skips this check"):
        load_model(ckpt)
    assert load_model(ckpt, check_finite=False).language_model.layers[0].self_attn.q_proj.weight[3, 5].isnan()

    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    middle = (8 + int.from_bytes(data[:8], "little") + len(data)) // 2  # of the bytes past the header
    data[middle:middle + 4096] = b"\xff" * 4096
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensors hold NaN or Inf .*\(model\.safetensors\)"):
        load_model(ckpt)

