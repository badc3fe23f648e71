"""demo/base.py: vision-tower pretraining on the synthetic world's scene labels (what only the
shipped from-scratch base needs), through its command line."""
import json

import pytest
import torch

import train
from demo.base import main, scene_labels
from demo.world import build_world
from model import load_model
from demo.tokenizer import train_tokenizer


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
    init = train.new_model("tiny", str(tok_path), torch.float32, "cpu").state_dict()
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
