"""LLaVA-Med in pure PyTorch: the model (llava.py), checkpoint loading (loading.py), LoRA (lora.py),
the tokenizer / prompt (tokenizer.py), many rows at once (rows.py) and the sentence encoder (sentence.py)."""
from .llava import Llava, LlavaConfig, TextConfig, VisionConfig, preset  # noqa: F401
from .loading import CheckpointError, load_model, save_model  # noqa: F401
from .sentence import SentenceEncoder, default_minilm_path  # noqa: F401
