"""model/llava.py against transformers on tiny random Llava checkpoints (loaded through
model/loading.py, whose own checks are in tests/test_loading.py)."""
import contextlib
import json
from unittest import mock

import pytest
import torch

import tiny
from model.llava import left_pad
from model import load_model
from model.llava import Llava, preset

pytest.importorskip("transformers")  # the reference; listed in requirements-test.txt, so never skipped in CI


rel_err, hf_logits, our_inputs = tiny.rel_err, tiny.hf_logits, tiny.our_inputs


@pytest.fixture(scope="module")
def hf_models():
    return {
        ("llama", "default"): tiny.hf_tiny_llava("llama", "default", seed=0),
        ("mistral", "default"): tiny.hf_tiny_llava("mistral", "default", seed=1),
        ("mistral", "full"): tiny.hf_tiny_llava("mistral", "full", feature_layer=-1, seed=2),
        ("mistral-window", "default"): tiny.hf_tiny_llava("mistral", "default", seed=3, sliding_window=6),
    }


@pytest.mark.parametrize("layout", ["llava-hf", "llava-hf-legacy", "llava-hf-legacy4", "llava-med"])
@pytest.mark.parametrize("arch", [("llama", "default"), ("mistral", "default"), ("mistral", "full"),
                                  ("mistral-window", "default")])
def test_logits_match_transformers(hf_models, tmp_path, layout, arch):
    """fp32 logits of our model equal transformers' (max relative error ≤ 1e-5) at every real
    position of a left-padded batch of two prompts with the image at different positions."""
    hf = hf_models[arch]
    ckpt = tiny.save_layout(hf, tmp_path / layout, layout, shards=2 if layout == "llava-hf" else 1)
    kw = {"vision_tower": tiny.save_clip_dir(hf, tmp_path / "clip")} if layout == "llava-med" else {}
    model = load_model(ckpt, **kw)
    n_img = model.config.num_image_tokens
    assert n_img == (16 if arch[1] == "default" else 17)
    ids, mask, pixels = tiny.batch_inputs(n_image=n_img)
    ours = model(our_inputs(model, ids), pixels, mask)
    ref = hf_logits(hf, ids, mask, pixels)
    real = mask.bool()
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    assert rel_err(ours[real], ref[real]) <= 1e-5


def test_linear_projector_matches_transformers_parts(hf_models, tmp_path):
    """LLaVA-Med v1's single linear projector: no transformers class has it, so the reference is
    assembled from transformers' parts — CLIP hidden state −2 without CLS, one Linear, then the
    transformers language model on the spliced embeddings."""
    hf = hf_models[("llama", "default")]
    ckpt = tiny.save_layout(hf, tmp_path / "med", "llava-med")
    # Turn the checkpoint into a `linear` one: linear_1 maps 32 → 64 straight into the decoder.
    from safetensors.torch import load_file, save_file
    sd = load_file(str(ckpt / "model.safetensors"))
    w, b = sd.pop("model.mm_projector.0.weight"), sd.pop("model.mm_projector.0.bias")
    sd.pop("model.mm_projector.2.weight"), sd.pop("model.mm_projector.2.bias")
    sd["model.mm_projector.weight"], sd["model.mm_projector.bias"] = w, b
    save_file(sd, str(ckpt / "model.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    model = load_model(ckpt, vision_tower=tiny.save_clip_dir(hf, tmp_path / "clip"))

    ids, mask, pixels = tiny.batch_inputs()
    with torch.no_grad():
        feats = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        visual = feats @ w.T + b  # (B, N, D)
        emb = hf.model.language_model.embed_tokens(ids.masked_fill(ids == tiny.IMAGE_TOKEN, 0))
        emb[ids == tiny.IMAGE_TOKEN] = visual.reshape(-1, visual.shape[-1])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        h = hf.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
        ref = hf.lm_head(h)
    ours = model(our_inputs(model, ids), pixels, mask)
    real = mask.bool()
    assert rel_err(ours[real], ref[real]) <= 1e-5


@pytest.fixture(scope="module")
def loaded(hf_models, tmp_path_factory):
    hf = hf_models[("mistral", "default")]
    return hf, load_model(tiny.save_layout(hf, tmp_path_factory.mktemp("ck"), "llava-hf-legacy"))


def test_greedy_generation_matches_transformers(loaded):
    """Greedy tokens identical to transformers' generate, including a row stopping at EOS early."""
    hf, model = loaded
    ids, mask, pixels = tiny.batch_inputs()
    ours = model.generate(ids, pixels, mask, max_new_tokens=12)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=12,
                          do_sample=False)[:, ids.shape[1]:]
    assert torch.equal(ours, ref)
    # Make a token that row r first emits at step k ≥ 1 the EOS: row r must stop there, the other
    # row wherever it first emits it (or never), both padded after, as in transformers.
    r, k = next((r, i) for r in (0, 1) for i in range(1, 12) if ours[r, i] not in ours[r, :i])
    eos = int(ours[r, k])
    ours = model.generate(ids, pixels, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=12,
                          do_sample=False, eos_token_id=eos, pad_token_id=0)[:, ids.shape[1]:]
    first_eos = [int((r == eos).nonzero()[0]) if (r == eos).any() else len(r) for r in ref]
    assert first_eos[r] == k
    for row, stop in enumerate(first_eos):
        assert torch.equal(ours[row, : stop + 1], ref[row, : stop + 1])
        assert (ours[row, stop + 1:] == 0).all()


def test_kv_cached_decoding_equals_full_forward(loaded):
    """Logits of every cached decode step equal a full forward over prompt + generated tokens."""
    _, model = loaded
    ids, mask, pixels = tiny.batch_inputs()
    new = model.generate(ids, pixels, mask, max_new_tokens=8, eos_token_id=-1)  # no early stop
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    logits = model(full_ids, pixels, full_mask)
    T = ids.shape[1]
    assert torch.equal(logits[:, T - 1:-1].argmax(-1), new)
    # And the step logits themselves, through the public cache API.
    model.setup_cache(2, full_ids.shape[1])
    try:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        first = model(ids, pixels, mask, position_ids=pos)[:, -1]
        steps = [first]
        for i in range(new.shape[1] - 1):
            slot = torch.tensor([T + i])
            steps.append(model.decode_one_token(new[:, i], pos[:, -1] + i + 1, slot, T + i + 1))
    finally:
        model.clear_cache()
    assert rel_err(torch.stack(steps, 1), logits[:, T - 1:-1]) <= 1e-5


def test_logits_positions_and_image_features(loaded):
    """Logits at chosen positions equal the gathered full logits; precomputed visual tokens give the
    same logits as pixels, and a row may hold fewer visual tokens (dropped tokens removed)."""
    _, model = loaded
    ids, mask, pixels = tiny.batch_inputs()
    full = model(ids, pixels, mask)
    positions = torch.tensor([[20, 22, 23], [0, 5, 23]])
    part = model(ids, pixels, mask, logits_positions=positions)
    assert rel_err(part, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))) <= 1e-6
    feats = model.encode_images(pixels)  # (2, 16, D)
    assert torch.allclose(model(ids, None, mask, image_features=feats), full, atol=1e-6)
    # A second row keeps 5 of its 16 image tokens (dropout by removal) and is left-padded to the
    # length of row 0: in a mixed batch its logits equal those of a batch of one.
    keep = torch.tensor([0, 3, 4, 9, 15])
    short = torch.cat([ids[1, :7], torch.full((5,), tiny.IMAGE_TOKEN), ids[1, 23:]])  # 13 tokens
    alone = model(short[None], None, None, image_features=feats[1, keep])[0]
    pad = ids.shape[1] - len(short)
    batch = torch.stack([ids[0], torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    bmask = torch.stack([mask[0], torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones_like(short)])])
    both = model(batch, None, bmask, image_features=torch.cat([feats[0], feats[1, keep]]))
    assert rel_err(both[1, pad:], alone) <= 1e-5
    assert rel_err(both[0][mask[0].bool()], full[0][mask[0].bool()]) <= 1e-5
    with pytest.raises(ValueError, match="image positions"):
        model(ids, None, mask, image_features=feats[:, :3])


def test_position_ids_default_and_gapped_match_transformers(loaded):
    """Explicit position ids equal to the default running count give identical logits; position ids
    with gaps (as for visual tokens removed from the middle, --drop-positions keep) are the ones
    RoPE uses: transformers given the same ids agrees, and the logits differ from the default."""
    hf, model = loaded
    ids, mask, pixels = tiny.batch_inputs()
    default = (mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(model(ids, pixels, mask, position_ids=default), model(ids, pixels, mask))
    gapped = default + 3 * (default >= 5) + 2 * (default >= 12)  # +3 from the 6th real token, +5 from the 13th
    ours = model(ids, pixels, mask, position_ids=gapped)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=gapped).logits
    real = mask.bool()
    assert rel_err(ours[real], ref[real]) <= 1e-5
    assert rel_err(ours[real], model(ids, pixels, mask)[real]) > 1e-3


def test_generate_shared_prefix_equals_generate(loaded):
    """Rows = a shared prefix (prompt + image) + their own suffix: generate_shared (each prefix
    prefilled once, its cache rows copied) gives generate()'s tokens on the concatenated rows, with
    and without dropping finished rows (`_keep_rows` made to keep all), including rows that stop
    at an early EOS."""
    _, model = loaded
    ids, mask, pixels = tiny.batch_inputs()
    feats = model.encode_images(pixels)  # (2, 16, D)
    prefixes = [ids[e][mask[e].bool()].tolist() for e in range(2)]
    rows = [0, 1, 0, 1, 0]
    after = [[], [30, 31], [40], [], [50, 51, 52]]  # each row: its prompt, then these tokens
    full_ids, full_mask = left_pad([prefixes[e] + x for e, x in zip(rows, after)], 0)
    row_feats = torch.cat([feats[e] for e in rows])
    ref = model.generate(full_ids, attention_mask=full_mask, image_features=row_feats, max_new_tokens=10,
                         eos_token_id=-1)
    # shared: each prompt but its last token; per row: that token, then its own tokens
    pids, pmask = left_pad([p[:-1] for p in prefixes], 0)
    sids, smask = left_pad([prefixes[e][-1:] + x for e, x in zip(rows, after)], 0)
    kw = dict(image_features=feats.reshape(-1, feats.shape[-1]), max_new_tokens=10)
    got = model.generate_shared(pids, pmask, torch.tensor(rows), sids, smask, eos_token_id=-1, **kw)
    assert torch.equal(got, ref)
    # An EOS that rows meet at different steps: they stop there, are padded after, and the others go on.
    eos = int(ref[2, 3])
    ref = model.generate(full_ids, attention_mask=full_mask, image_features=row_feats, max_new_tokens=10,
                         eos_token_id=eos, pad_token_id=0)
    assert (ref == eos).any(1).sum() >= 1 and not (ref == eos).any(1).all()
    for drop in (False, True):
        keep_all = mock.patch.object(model, "_keep_rows", lambda _, *state: state)
        with contextlib.nullcontext() if drop else keep_all:
            got = model.generate_shared(pids, pmask, torch.tensor(rows), sids, smask, eos_token_id=eos,
                                        pad_token_id=0, **kw)
            assert torch.equal(got, ref)
            assert torch.equal(model.generate(full_ids, attention_mask=full_mask, image_features=row_feats,
                                              max_new_tokens=10, eos_token_id=eos, pad_token_id=0), ref)
    with pytest.raises(ValueError, match="image placeholders"):
        model.generate_shared(pids, pmask, torch.tensor([0]), torch.tensor([[tiny.IMAGE_TOKEN]]),
                              torch.ones(1, 1), **kw)
    with pytest.raises(ValueError, match="at least one real token"):
        model.generate_shared(pids, pmask, torch.tensor([0]), torch.tensor([[5, 0]]), torch.tensor([[1, 0]]), **kw)


def test_presets_build_on_meta():
    with torch.device("meta"):
        big = Llava(preset("llava-med-v1.5-mistral-7b"))
    n = sum(p.numel() for p in big.parameters())
    # Mistral-7B (7.24e9) + CLIP ViT-L (3.0e8, incl. the unused last block) + projector (2.1e7).
    assert 7.5e9 < n < 7.6e9
    assert big.config.num_image_tokens == 576 and big.config.vision_layers_used == 23
    t = Llava(preset("tiny"))
    assert t(torch.tensor([[1, 2]])).shape == (1, 2, t.config.text.vocab_size)


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = left_pad([[], [1]], pad_id=9)
    assert ids.tolist() == [[9], [1]] and mask.tolist() == [[0], [1]]
