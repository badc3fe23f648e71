"""hscr.py → train.py → eval.py as a user runs them on LLaVA-Med v1.5 (README, "Running on real LLaVA-Med
v1.5"), on a stand-in with the real layout and random weights: four bf16 shards and their index, a
LLaVA-Med config.json naming OpenAI's CLIP tower, Mistral's SentencePiece tokenizer.model (v1, from the
mistral-common wheel: the one LLaVA-Med ships, vocabulary 32,000), a sliding window, and a small CLIP
at 336 px with 14 px patches (576 image tokens) given as --vision-tower; instruction data in
llava_med_instruct_60k.json's format and the real VQA-RAD question file. The model is named once, to
hscr.py: train.py reads it from the preference file, eval.py from the adapter. Converting the
tokenizer, as the README suggests, changes nothing: each output resumes and train.py trains on the
ids hscr.py scored."""
from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import eval as evaluation
import hscr
import tiny
import train
from harness import provenance
from model.tokenizer import main as tokenizer_main

VQA_RAD = Path(__file__).resolve().parent / "data" / "VQA_RAD_test_llavamed_format.jsonl"
QUESTIONS = 4  # eval.py --limit: the first questions of the VQA-RAD file

# Entries as llava_med_instruct_60k.json holds them (PMC figure ids, "<image>" at either end).
INSTRUCT = [
    ("35166216_F3", "What type of imaging is shown in the figure?",
     "The figure shows a contrast-enhanced axial CT scan of the abdomen."),
    ("33489417_F1", "Where is the lesion located?", "The lesion is in the right lower lobe of the lung."),
    ("30412347_F2", "What does the arrow point to?", "The arrow points to a hypodense mass in the liver."),
    ("34225789_F4", "Describe the findings in the image.",
     "There is a large left-sided pleural effusion with partial collapse of the lower lobe."),
    ("29876543_F1", "What is the size of the nodule?", "The nodule measures about 12 mm in diameter."),
    ("31234987_F5", "Which organ is affected?", "The kidney, with several cysts in its upper pole."),
    ("32109876_F2", "Is there any sign of fracture?", "Yes, there is a fracture of the distal radius."),
    ("33987012_F3", "What modality was used?",
     "This is a T2-weighted MRI of the brain in the sagittal plane."),
]


def photo(path: Path, size: tuple[int, int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(path)


def standin(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """(checkpoint, CLIP directory) of a LLaVA-Med v1.5 stand-in with small widths."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=336, patch_size=14, projection_dim=16)
    text = MistralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                         sliding_window=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                   image_token_index=31999, vision_feature_layer=-2))
    hf = hf.to(torch.bfloat16)
    ckpt = tiny.save_layout(hf, root / "llava-med-v1.5-mistral-7b", "llava-med", shards=4)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(_name_or_path="microsoft/llava-med-v1.5-mistral-7b", torch_dtype="bfloat16", use_cache=True,
                  mm_vision_tower="openai/clip-vit-large-patch14-336", mm_patch_merge_type="flat")
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
    spm = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    shutil.copyfile(str(spm), ckpt / "tokenizer.model")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 2048}))
    (ckpt / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    return ckpt, tiny.save_clip_dir(hf, root / "clip-vit-336-small")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The stand-in, 8 instruction entries with their images, and the first VQA-RAD questions' images."""
    root = tmp_path_factory.mktemp("real")
    ckpt, clip = standin(root)
    assert len(list(ckpt.glob("model-0000?-of-00004.safetensors"))) == 4
    (root / "images").mkdir()
    entries = []
    for k, (pmc, question, answer) in enumerate(INSTRUCT):
        photo(root / "images" / f"{pmc}.jpg", (480 + 16 * k, 360 - 8 * k), seed=k)
        human = f"<image>\n{question}" if k % 2 else f"{question}\n<image>"
        turns = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
        entries.append({"id": pmc, "image": f"{pmc}.jpg", "conversations": turns})
    (root / "llava_med_instruct_60k.json").write_text(json.dumps(entries, indent=1))
    (root / "vqa_rad" / "images").mkdir(parents=True)
    lines = VQA_RAD.read_text().splitlines()[:QUESTIONS]
    for k, image in enumerate(sorted({json.loads(line)["image"] for line in lines})):
        photo(root / "vqa_rad" / "images" / image, (512, 512), seed=100 + k)
    return root, ckpt, clip


@pytest.mark.slow
def test_the_readme_commands_on_a_llava_med_standin(world, capsys):
    """The README's real-data commands, sizes cut: the model named once; train.py and eval.py run on it
    without --model or --vision-tower, and on the stored ids; after `python -m model.tokenizer convert`
    every output resumes (nothing computed again) and train.py still trains on the stored ids."""
    root, ckpt, clip = world
    prefs, run, answers = root / "prefs.jsonl", root / "runs" / "hscr", root / "runs" / "eval-hscr"
    hscr_argv = ["--model", str(ckpt), "--vision-tower", str(clip), "--data",
                 str(root / "llava_med_instruct_60k.json"), "--image-root", str(root / "images"), "--out",
                 str(prefs), "--limit", "2000", "--batch-size", "4", "--max-new-tokens", "8"]
    train_argv = ["--data", str(prefs), "--out", str(run), "--gradient-checkpointing", "--batch-size", "4",
                  "--micro-batch", "2", "--max-steps", "1", "--no-plot"]
    eval_argv = ["--adapter", str(run / "adapter"), "--benchmark", f"vqa_rad={VQA_RAD}",
                 "--image-root", f"vqa_rad={root / 'vqa_rad' / 'images'}", "--out", str(answers), "--blind",
                 "--limit", str(QUESTIONS), "--max-new-tokens", "8"]

    summary = hscr.main(hscr_argv)
    assert summary["entries_written"] >= 4 and summary["processed_this_run"] == len(INSTRUCT)
    header = json.loads(prefs.read_text().splitlines()[0])["provenance"]
    capsys.readouterr()
    train.main(train_argv)
    err = capsys.readouterr().err
    written = len(prefs.read_text().splitlines()) - 1  # the records, after the header
    assert f"{written} records trained on the token ids stored with them" in err
    made = provenance.load(run / "provenance.json")["fingerprint"]
    assert {k: made[k] for k in ("model", "vision tower", "tokenizer")} == \
           {k: header[k] for k in ("model", "vision tower", "tokenizer")}
    eval_cfg = evaluation.EvalConfig(**vars(evaluation.build_parser().parse_args(eval_argv)))
    results = evaluation.run(eval_cfg)
    assert results["vqa_rad"]["modes"]["full"]["n_questions"] == QUESTIONS
    resolved = json.loads((answers / "config.json").read_text())
    assert (resolved["model"], resolved["vision_tower"]) == (str(ckpt.resolve()), str(clip.resolve()))

    # The README's tokenizer conversion: every directory now loads tokenizer.json.
    tokenizer_main(["convert", str(ckpt / "tokenizer.model"), str(ckpt / "tokenizer.json")])
    before = {p: p.read_bytes() for p in (prefs, answers / "vqa_rad" / "answers.jsonl")}
    assert hscr.main(hscr_argv)["processed_this_run"] == 0
    capsys.readouterr()
    resume = train.TrainConfig(**vars(train.build_parser().parse_args(train_argv + ["--resume"])))
    assert train.train(resume) == {"step": 1, "reused": True}
    assert f"{written} records trained on the token ids stored with them" in capsys.readouterr().err
    evaluation.run(eval_cfg)
    assert {p: p.read_bytes() for p in before} == before
