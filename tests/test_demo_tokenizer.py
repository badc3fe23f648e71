"""demo/tokenizer.py: the shipped base's tokenizer, trained from scratch in the Llama layout."""
import json

import pytest

import demo.tokenizer as module
from demo.tokenizer import main, train_tokenizer
from model.tokenizer import build_prompt, decode, tokenize_prompt
from test_tokenizer import whole_prompt_ids


def test_train_tokenizer_is_llama_shaped():
    """A tokenizer trained on a few sentences has the Llama layout (0 <unk>, 1 <s>, 2 </s>,
    3 <image>, 4.. byte pieces), never maps a character to <unk> (byte fallback), round-trips
    text, and works with both image conventions."""
    texts = ["Is there a nodule in the left lung?", "There are two small nodules in the right lung.",
             "No abnormality is seen.", "[INST] <image>\nDescribe the findings. [/INST]"] * 5
    tok = train_tokenizer(texts, vocab_size=300)
    assert tok.get_vocab_size() == 300
    assert [tok.id_to_token(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<image>", "<0x00>"]
    for text in texts[:3] + ["unseen ünïcödé 😀  two  spaces"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert 0 not in ids
        assert decode(tok, ids) == text.strip()
    # Learnt pieces never span a space: every piece holding "▁" starts with it, once.
    assert all(p.count("\u2581") <= 1 and (p.startswith("\u2581") or "\u2581" not in p) for p in tok.get_vocab())
    prompt = build_prompt("Describe the findings.")
    chunked = tokenize_prompt(tok, prompt, image_token_id=3, num_image_tokens=4)
    assert chunked[0] == 1 and chunked.count(3) == 4
    # llava-hf's convention (the whole prompt at once, <image> a real token) gives the same ids.
    assert chunked == whole_prompt_ids(tok, prompt, 3, 4)
    with pytest.raises(ValueError, match="no room"):
        train_tokenizer(texts, vocab_size=200)


def test_cli_keeps_repeated_texts(tmp_path, monkeypatch):
    """BPE ranks merges by frequency: the CLI must pass every turn, repeats included (a set of
    distinct texts left the world's commonest answer "yes" split as "▁" + "yes")."""
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "<image>\nIs it?"},
                                                {"from": "gpt", "value": "yes" if i % 4 else "no"}]}
               for i in range(8)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    seen = []
    real = module.train_tokenizer
    monkeypatch.setattr(module, "train_tokenizer", lambda texts, vocab_size: seen.extend(texts) or real(texts, vocab_size))
    main([str(tmp_path / "tok.json"), "--json", str(tmp_path / "data.json"), "--vocab-size", "300"])
    assert seen.count("yes") == 6 and seen.count("no") == 2 and seen.count("Is it?") == 8
    assert (tmp_path / "tok.json").is_file()
