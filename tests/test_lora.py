"""model/lora.py: LoRA on our Llava (zero init, on/off switch, merged export, frozen base) and PEFT's
adapter format, with peft + transformers on the same tiny checkpoint as the reference."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from model import load_model
from model.lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, export_merged, load_adapter, lora_disabled,
                        lora_modules, lora_parameters, merged_state_dict,
                        our_module_name, peft_module_name, save_adapter)

N_LAYERS = 2  # tiny.hf_tiny_llava


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random transformers Llava saved in the llava-hf layout (the PEFT reference's own)."""
    return tiny.save_layout(tiny.hf_tiny_llava("llama", seed=0), tmp_path_factory.mktemp("ckpt"), "llava-hf")


@pytest.fixture(scope="module")
def inputs():
    ids, mask, pixels = tiny.batch_inputs()
    return ids, mask, pixels


def logits(model, inputs):
    ids, mask, pixels = inputs
    return model(ids, pixels, mask)[mask.bool()]  # (real positions, V)


def randomize_lora(model, seed=0):
    """Non-zero B (a fresh adapter has B = 0) so that every test sees the update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))


def test_apply_lora_replaces_exact_names_and_freezes(checkpoint):
    model = load_model(checkpoint)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, rank=4, alpha=8, dropout=0.0)
    expected = [f"language_model.layers.{i}.{sub}" for i in range(N_LAYERS)
                for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(names) == sorted(expected) == sorted(lora_modules(model))
    # CLIP's q_proj/k_proj/v_proj lie outside the scope and stay plain.
    assert type(model.vision_tower.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    # The frozen weights keep their names: the base state dict is a subset, tensors unchanged.
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base.items())
    extra = sorted(set(sd) - set(base))
    assert extra == sorted(f"{n}.lora_{ab}.weight" for n in expected for ab in "AB")
    assert model.load_state_dict(base, strict=False).unexpected_keys == []
    # Only the adapter trains.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(extra)
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    # Kaiming-uniform with a = √5 on A: bound 1/√fan_in; B = 0; scale α/r.
    q = model.language_model.layers[0].self_attn.q_proj
    bound = 1 / math.sqrt(q.in_features)
    assert 0.8 * bound < q.lora_A.weight.abs().max() <= bound
    assert (q.lora_B.weight == 0).all() and q.scale == 2.0
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="qkv_proj"):
        apply_lora(load_model(checkpoint), targets=("q_proj", "qkv_proj"))


def test_zero_init_equals_base(checkpoint, inputs):
    model = load_model(checkpoint)
    ref = logits(model, inputs)
    apply_lora(model)
    assert torch.equal(logits(model, inputs), ref)


def test_training_moves_only_lora_and_disabled_is_base(checkpoint, inputs):
    model = load_model(checkpoint)
    ref = logits(model, inputs)
    apply_lora(model, rank=4, alpha=8, dropout=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    ids, mask, pixels = inputs
    for _ in range(3):
        loss = model(ids, pixels, mask)[mask.bool()].logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(m.lora_B.weight.abs().max() > 0 for m in lora_modules(model).values())
    policy = logits(model, inputs)
    assert (policy - ref).abs().max() > 1e-3
    with lora_disabled(model):
        assert torch.equal(logits(model, inputs), ref)
    assert torch.equal(logits(model, inputs), policy)  # switched back on


def test_export_merged_loads_as_base_checkpoint(checkpoint, inputs, tmp_path):
    model = load_model(checkpoint)
    apply_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    policy = logits(model, inputs)
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    sd = merged_state_dict(model)
    assert not any(".lora_" in k for k in sd)
    # With the source checkpoint: exactly its keys and config.json; loads and computes the policy.
    out = export_merged(model, tmp_path / "merged", source=checkpoint)
    source_keys = sorted(k for f in checkpoint.glob("*.safetensors") for k in load_file(f))
    assert sorted(load_file(out / "model.safetensors")) == source_keys
    assert (out / "config.json").read_text() == (checkpoint / "config.json").read_text()
    torch.testing.assert_close(logits(load_model(out), inputs), policy, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())  # the model is left as it was


def test_export_merged_keeps_the_source_dtype(checkpoint, tmp_path):
    """A bf16 checkpoint (its config says so) trained in fp32: the merged weights are written in bf16,
    each rounded once from the fp32 merge, not in the training dtype."""
    source = tmp_path / "bf16"
    source.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(checkpoint / "model.safetensors").items()},
              source / "model.safetensors")
    config = json.loads((checkpoint / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    model = load_model(source)  # float32
    apply_lora(model, rank=4, alpha=8)
    randomize_lora(model)
    merged = merged_state_dict(model)
    out = load_file(export_merged(model, tmp_path / "merged", source=source) / "model.safetensors")
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(out[key], merged["language_model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))


def test_peft_names_round_trip():
    ours = "language_model.layers.12.mlp.down_proj"
    assert peft_module_name(ours) == "model.language_model.layers.12.mlp.down_proj"
    assert our_module_name("model.language_model.layers.12.mlp.down_proj") == ours
    assert our_module_name("language_model.model.layers.12.mlp.down_proj") == ours  # transformers 4.x layout
    assert peft_module_name("vision_tower.encoder.layers.0.self_attn.q_proj") is None
    assert our_module_name("model.vision_tower.encoder.layers.0.self_attn.q_proj") is None


def hf_logits(hf, inputs):
    ids, mask, pixels = inputs
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # our position numbering for left padding
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=pos).logits[mask.bool()]


def test_our_adapter_loads_in_peft(checkpoint, inputs, tmp_path):
    peft = pytest.importorskip("peft")
    model = load_model(checkpoint)
    apply_lora(model, rank=4, alpha=8, dropout=0.05)
    randomize_lora(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter", base_model_path=str(checkpoint))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["base_model_name_or_path"] == str(checkpoint)

    hf = peft.PeftModel.from_pretrained(tiny.hf_tiny_llava("llama", seed=0), tmp_path / "adapter").eval()
    wrapped = sorted(n for n, m in hf.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert len(wrapped) == 7 * N_LAYERS and all(".language_model." in n for n in wrapped)
    rel = ((logits(model, inputs) - hf_logits(hf, inputs)).abs().max() / hf_logits(hf, inputs).abs().max())
    assert rel <= 1e-5
    with torch.no_grad(), lora_disabled(model):
        base = logits(model, inputs)
    assert (base - hf_logits(hf, inputs)).abs().max() > 1e-3  # the adapter matters


def test_peft_adapter_loads_in_ours(checkpoint, inputs, tmp_path):
    peft = pytest.importorskip("peft")
    hf = tiny.hf_tiny_llava("llama", seed=0)
    targets = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets,
                                                   init_lora_weights=False))  # random A and B
    hf.save_pretrained(tmp_path / "peft")
    model = load_model(checkpoint)
    names = load_adapter(model, tmp_path / "peft")
    assert len(names) == 7 * N_LAYERS and set(DEFAULT_TARGETS) == {n.rpartition(".")[2] for n in names}
    assert lora_modules(model)["language_model.layers.0.self_attn.q_proj"].scale == 4.0
    model.eval()
    hf.eval()
    torch.testing.assert_close(logits(model, inputs), hf_logits(hf, inputs), rtol=1e-5, atol=1e-5)
    # And back: our save of what we loaded holds PEFT's tensors under PEFT's names.
    save_adapter(model, tmp_path / "ours")
    theirs, ours = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(
        tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_load_adapter_errors_list_keys_and_file(checkpoint, tmp_path):
    model = load_model(checkpoint)
    apply_lora(model, rank=4, alpha=8)
    save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(weights)
    gone = "base_model.model.model.language_model.layers.1.mlp.up_proj.lora_B.weight"
    kept = tensors.pop(gone)
    tensors["base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, weights)
    with pytest.raises(ValueError) as err:
        load_adapter(model, tmp_path / "a")
    message = str(err.value)
    assert str(weights) in message and "vision_tower.encoder.layers.0" in message
    assert "language_model.layers.1.mlp.up_proj.lora_B" in message
    tensors[gone] = kept
    del tensors["base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
    tensors[gone][0, 1] = float("nan")  # damaged bytes: issue #24 item 1, for adapters too
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: NaN or Inf: \[.*layers\.1\.mlp\.up_proj\.lora_B"):
        load_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["use_dora"] = True
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(model, tmp_path / "a")


def test_lora_linear_dtypes():
    """A bf16 base with the fp32 adapter: output in bf16, equal to the fp32 computation rounded."""
    base = torch.nn.Linear(8, 6, bias=True).bfloat16()
    layer = LoRALinear(base, rank=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    expected = torch.nn.functional.linear(x, base.weight, base.bias).float() + x.float() @ layer.delta_weight().T
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
