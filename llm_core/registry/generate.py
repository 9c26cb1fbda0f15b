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
from llm_core.data.chat_template import ASSISTANT, END, USER, render
from llm_core.data.tokenizer import EOT, load_tokenizer

PACKAGE_FILES = ("model.safetensors", "model_config.json")
TURN_STARTS = (USER, ASSISTANT, EOT)  # a chat model that starts another turn or document has ended its answer


class TextGenerator:
    """A model and its tokenizer. `stream` yields text as it is generated; `complete` returns it.
    A chat model's answers: `reply` streams one, `answer` returns it as a chat completion."""

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

    def chat_prompt(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """The ids a chat model answers `messages` from (the template, then <|assistant|>), and the ids
        that end its answer: <|end|>, or any turn or document start."""
        ids = render(self.tokenizer, messages, add_generation_prompt=True).ids
        return ids, [self.tokenizer.token_to_id(t) for t in (END, *TURN_STARTS)]

    def reply(self, messages: list[dict], max_new_tokens: int = 200, temperature: float = 0.0,
              top_k: int | None = None, seed: int | None = 0) -> Iterator[str]:
        """The assistant's answer to `messages`, streamed, until it ends its turn (temperature 0: greedy)."""
        ids, stops = self.chat_prompt(messages)
        yield from self.stream_ids(ids, stops, max_new_tokens, temperature, top_k, seed)

    def answer(self, messages: list[dict], max_new_tokens: int = 200, temperature: float = 0.0,
               top_k: int | None = None, seed: int | None = 0) -> dict:
        """The same answer as `reply`, whole, as a chat completion in OpenAI's shape: finish_reason "stop"
        when the model ended its turn, "length" when max_new_tokens cut it; token counts in usage."""
        ids, stops = self.chat_prompt(messages)
        tokens = [int(t) for t in self.model.generate(torch.tensor([ids]), max_new_tokens, temperature=temperature,
                                                      top_k=top_k, seed=seed, stop_token=stops)]
        ended = bool(tokens) and tokens[-1] in stops
        content = self.tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False)
        return {"object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": "stop" if ended else "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens),
                          "total_tokens": len(ids) + len(tokens)}}


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
