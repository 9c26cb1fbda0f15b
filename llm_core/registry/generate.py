"""Text generation with a trained model, from a model directory.

A model directory holds everything generation needs, and nothing else is read:

    model.safetensors      the weights
    model_config.json      {"model": ModelArgs, "config": the training config}
    tokenizer/             tokenizer.json (+ the files transformers' AutoTokenizer reads)

`trained_model` writes one per training; the registered MLflow model carries one as its artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from tokenizers import Tokenizer

from llm_core.files import copy_file
from llm_core.layout import MODEL_TOKENIZER_SUBDIR
from llm_core.model import Transformer
from llm_core.model_files import copy_tokenizer
from llm_core.data.tokenizer import EOT, load_tokenizer

PACKAGE_FILES = ("model.safetensors", "model_config.json")


class TextGenerator:
    """A model and its tokenizer. `stream` yields text as it is generated; `complete` returns it."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.encode_special_tokens = True  # a prompt is text, even if it spells a special token
        self.eot = tokenizer.token_to_id(EOT)

    def stream(self, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int | None = None,
               seed: int | None = 0) -> Iterator[str]:
        """The continuation of `prompt` (without it), piece by piece, stopping at <|endoftext|>.
        An empty prompt starts from <|endoftext|>, the start of a new document."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids or [self.eot]
        yield from self.stream_ids(ids, self.eot, max_new_tokens, temperature, top_k, seed)

    def stream_ids(self, ids: list[int], stop_token: int | list[int], max_new_tokens: int = 100,
                   temperature: float = 0.8, top_k: int | None = None, seed: int | None = 0) -> Iterator[str]:
        """The text generated after the token ids `ids`, piece by piece, until a stop token (not included)."""
        stops = {stop_token} if isinstance(stop_token, int) else set(stop_token)
        new_ids: list[int] = []
        emitted = ""
        tokens = self.model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k,
                                     seed=seed, stop_token=stop_token)
        for token in tokens:
            if int(token) in stops:
                break
            new_ids.append(int(token))
            text = self.tokenizer.decode(new_ids, skip_special_tokens=False)
            # Byte-level BPE: a token can end inside a UTF-8 character; wait for the rest of it.
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        text = self.tokenizer.decode(new_ids, skip_special_tokens=False)
        if len(text) > len(emitted):
            yield text[len(emitted):]

    def complete(self, prompt: str, **kwargs) -> str:
        return "".join(self.stream(prompt, **kwargs))


def load_generator(model_dir: Path, tokenizer_dir: Path | None = None) -> TextGenerator:
    """The generator of a model directory (see the module docstring)."""
    from llm_core.model_files import load_model

    model_dir = Path(model_dir)
    missing = [name for name in PACKAGE_FILES if not (model_dir / name).exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir} is not a trained model directory: no {', '.join(missing)}")
    tokenizer_dir = Path(tokenizer_dir or model_dir / MODEL_TOKENIZER_SUBDIR)
    return TextGenerator(load_model(model_dir), load_tokenizer(tokenizer_dir))


def package_model(model_dir: Path, tokenizer_dir: Path, out_dir: Path) -> Path:
    """Copy what generation needs (weights, model config, tokenizer) into `out_dir`: a model
    directory without checkpoints or optimizer state, small enough to register or ship."""
    for name in PACKAGE_FILES:
        copy_file(Path(model_dir) / name, Path(out_dir) / name)
    copy_tokenizer(tokenizer_dir, out_dir)
    return Path(out_dir)
