"""demo/base.py, through its command line: vision-tower pretraining on the synthetic world's scene
labels, and instruction tuning (SFT) of the whole model, from a checkpoint or a new `--init-preset`
model sized to the tokenizer (what only the shipped from-scratch base needs)."""
import json

import pytest
import torch
from PIL import Image

import tiny
from demo.base import main, new_model, scene_labels
from demo.world import build_world
from harness.cli import run_main
from model import load_model
from demo.tokenizer import train_tokenizer
from test_train import word_tokenizer


def test_vision_stage_trains_the_tower_only(tmp_path):
    """`python -m demo.base vision` on world records: the tower changes, the projector and decoder
    do not, out/model loads, and a record without a `scene` or a line that is not JSON is reported
    in bad_records.jsonl, not fatal."""
    world = build_world(tmp_path / "world", n_sft=12, n_align=0, n_val=0, n_test=0)
    tok_path = tmp_path / "tokenizer.json"
    train_tokenizer(["is there a nodule ?", "yes", "no", "[INST] [/INST]"], vocab_size=300).save(str(tok_path))
    records = json.loads(world["sft"].read_text())
    del records[3]["scene"]
    # JSON lines, line 5 broken: bad records are indexed by their 0-based line.
    lines = [json.dumps(r) for r in records]
    lines[5] = "{not json"
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    main(["vision", "--init-preset", "tiny", "--tokenizer", str(tok_path), "--data", str(tmp_path / "sft.jsonl"),
          "--image-root", str(world["root"]), "--out", str(out), "--batch-size", "8", "--max-steps", "3",
          "--lr", "1e-3", "--device", "cpu"])
    torch.manual_seed(0)  # the run's --seed: the same initialisation
    init = new_model("tiny", str(tok_path), torch.float32, "cpu").state_dict()
    trained = load_model(out / "model").state_dict()
    assert not torch.equal(trained["vision_tower.encoder.layers.0.mlp.fc1.weight"],
                           init["vision_tower.encoder.layers.0.mlp.fc1.weight"])
    for name in ("multi_modal_projector.linear_1.weight", "language_model.layers.0.self_attn.q_proj.weight"):
        assert torch.equal(trained[name], init[name]), name
    bad = [json.loads(line) for line in (out / "bad_records.jsonl").read_text().splitlines()]
    assert [b["index"] for b in bad] == [3, 5]
    assert "scene" in bad[0]["reason"] and "JSON" in bad[1]["reason"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "model" / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3


def test_vision_needs_a_model_or_a_preset(capsys):
    with pytest.raises(SystemExit) as e:
        main(["vision", "--data", "records.json"])
    assert e.value.code == 2 and "--model is required" in capsys.readouterr().err


def test_scene_labels():
    """present, left, small, count, modality index (xray, mri, ct)."""
    labels = scene_labels({"scene": {"modality": "ct", "count": 2, "side": "left", "size": "large"}})
    assert labels.tolist() == [1.0, 1.0, 0.0, 2.0, 2.0]
    assert scene_labels({"scene": {"modality": "mri", "count": 0, "side": None, "size": None}}).tolist() == \
        [0.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="modality"):
        scene_labels({"scene": {"modality": "pet", "count": 0, "side": None, "size": None}})


def images(root, n: int, size=(20, 24)) -> None:
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()).save(
            root / f"img{k}.png")


def test_sft_of_a_checkpoint(tmp_path):
    """`sft --model`: multi-turn conversations (answers are the targets) lower the held-out loss of a
    tiny random checkpoint; a broken conversation is skipped and listed (once per file it is read
    from); out/model, with its tokenizer, loads and differs from the checkpoint."""
    ckpt = tiny.save_layout(tiny.hf_tiny_llava("llama", seed=0), tmp_path / "ckpt", "llava-hf")
    word_tokenizer().save(str(ckpt / "tokenizer.json"))
    images(tmp_path, 3)
    records = [{"id": f"s{i}", "image": f"img{i % 3}.png",
                "conversations": [{"from": "human", "value": "<image>\nwhat is shown in the image ?"},
                                  {"from": "gpt", "value": f"a {['mass', 'lesion'][i % 2]} in the left lung"},
                                  {"from": "human", "value": "is there a fracture ?"},
                                  {"from": "gpt", "value": "no"}]} for i in range(8)]
    records.append({"id": "broken", "image": "img0.png", "conversations": [{"from": "human", "value": "what ?"}]})
    data = tmp_path / "instruct.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "sft"
    assert run_main(main, ["sft", "--model", str(ckpt), "--data", str(data), "--eval-data", str(data),
                           "--out", str(out), "--batch-size", "4", "--micro-batch", "2", "--epochs", "3",
                           "--lr", "3e-3", "--warmup-ratio", "0", "--device", "cpu"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7)) and "eval_loss" in metrics[-1]
    # Random init: about ln V = ln 128 ≈ 4.85 per answer token; six steps must cut it clearly.
    assert metrics[0]["loss"] > 4.5 and metrics[-1]["eval_loss"] < metrics[0]["loss"] - 0.4
    assert [json.loads(line)["id"] for line in (out / "bad_records.jsonl").read_text().splitlines()] == ["broken"] * 2
    trained, before = load_model(out / "model"), load_model(ckpt)
    assert (out / "model" / "tokenizer.json").is_file()
    assert not torch.equal(trained.state_dict()["lm_head.weight"], before.state_dict()["lm_head.weight"])


def test_sft_of_a_new_preset_model_trains_every_part(tmp_path):
    """`sft --init-preset tiny` builds a random model sized to the tokenizer (vocabulary, <image> id)
    and trains all of it: after two steps the vision tower, projector and decoder all differ from
    the same-seed initialisation, the loss fell, and out/model is a checkpoint load_model reads."""
    texts = ["is there a nodule ?", "yes", "no", "which side ?", "left", "right"]
    tok_path = tmp_path / "tokenizer.json"
    train_tokenizer(texts + ["[INST] [/INST]"], vocab_size=300).save(str(tok_path))
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(8):
        Image.fromarray((torch.rand(64, 64, generator=g) * 255).to(torch.uint8).numpy()).save(tmp_path / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhich side ?"}, {"from": "gpt", "value": ["left", "right"][i % 2]}]})
    (tmp_path / "sft.json").write_text(json.dumps(records))
    out = tmp_path / "out"
    main(["sft", "--init-preset", "tiny", "--tokenizer", str(tok_path), "--data", str(tmp_path / "sft.json"),
          "--eval-fraction", "0", "--out", str(out), "--batch-size", "4", "--micro-batch", "4", "--epochs", "1",
          "--lr", "3e-3", "--warmup-ratio", "0", "--device", "cpu"])
    torch.manual_seed(0)  # the run's --seed: the same initialisation
    init = new_model("tiny", str(tok_path), torch.float32, "cpu").state_dict()
    model = load_model(out / "model")
    assert model.config.text.vocab_size == 300 and model.config.image_token_id == 3
    trained = model.state_dict()
    for name in ("vision_tower.encoder.layers.0.mlp.fc1.weight", "multi_modal_projector.linear_1.weight",
                 "language_model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        assert not torch.equal(trained[name], init[name]), name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert (out / "model" / "tokenizer.json").is_file()


def test_sft_refuses_too_little_data_in_one_line(tmp_path, capsys):
    ckpt = tiny.save_layout(tiny.hf_tiny_llava("llama", seed=0), tmp_path / "ckpt", "llava-hf")
    word_tokenizer().save(str(ckpt / "tokenizer.json"))
    images(tmp_path, 1)
    records = [{"id": "a", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nwhat ?"},
                                                                    {"from": "gpt", "value": "no"}]}]
    (tmp_path / "sft.json").write_text(json.dumps(records))
    assert run_main(main, ["sft", "--model", str(ckpt), "--data", str(tmp_path / "sft.json"), "--eval-fraction", "0",
                           "--out", str(tmp_path / "out"), "--batch-size", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "1 training conversations" in err and "--batch-size 4" in err


def test_sft_refuses_torchrun_in_one_line(tmp_path, capsys, monkeypatch):
    """SFT runs in one process: under torchrun (WORLD_SIZE > 1) it stops before anything is read
    or written, in one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_main(main, ["sft", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "sft.json"),
                           "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "one process" in err and "torchrun" in err and not (tmp_path / "out").exists()
