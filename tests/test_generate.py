"""llm_core.registry.generate: seeded and greedy sampling, streaming, UTF-8-safe pieces, packaged model directories."""

import pytest
import torch

from llm_core.registry.generate import TextGenerator, load_generator, package_model
from llm_core.model import ModelArgs, Transformer
from llm_core.data.tokenizer import EOT, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_samples_are_seeded_and_greedy_at_temperature_zero(trained):
    cfg, _, model = trained
    generator = TextGenerator(model, load_tokenizer(cfg.data_path / "tokenizer"))
    same = [generator.complete("ROMEO:", max_new_tokens=12, temperature=0.8, seed=5) for _ in range(2)]
    assert same[0] == same[1] and len(same[0]) > 0
    assert generator.complete("ROMEO:", max_new_tokens=12, temperature=0.8, seed=6) != same[0]
    greedy = [generator.complete("ROMEO:", max_new_tokens=12, temperature=0.0, seed=s) for s in (1, 2)]
    assert greedy[0] == greedy[1]


def test_streamed_pieces_add_up_to_the_completion(trained):
    cfg, _, model = trained
    generator = TextGenerator(model, load_tokenizer(cfg.data_path / "tokenizer"))
    pieces = list(generator.stream("ROMEO:", max_new_tokens=30, temperature=1.0, seed=4))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == generator.complete("ROMEO:", max_new_tokens=30, temperature=1.0, seed=4)


MULTIBYTE = "née € 😀 日本"  # 2-, 3- and 4-byte UTF-8 characters


def test_streamed_pieces_never_end_inside_a_utf8_character(trained):
    """A model that learned one document by heart emits its tokens, several of them single bytes of
    a multi-byte character: every streamed piece is whole characters, and they join to the text."""
    cfg, _, _ = trained
    tokenizer = load_tokenizer(cfg.data_path / "tokenizer")
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "no token splits a character: the test proves nothing"
    eot = tokenizer.token_to_id(EOT)
    document = torch.tensor([[eot, *ids, eot]])
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                                  n_embd=64, block_size=32)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(document[:, :-1], document[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05

    pieces = list(TextGenerator(model, tokenizer).stream("", max_new_tokens=len(ids) + 5, temperature=0.0))
    assert "".join(pieces) == MULTIBYTE  # the whole document, then <|endoftext|> stops it
    assert len(pieces) > 1 and not any("\ufffd" in piece for piece in pieces), pieces


def test_a_packaged_model_generates_the_same_text(trained, tmp_path):
    cfg, result, model = trained
    package = package_model(result.out_dir, cfg.data_path / "tokenizer", tmp_path / "package")
    assert sorted(p.name for p in package.iterdir()) == ["model.safetensors", "model_config.json", "tokenizer"]
    expected = TextGenerator(model, load_tokenizer(cfg.data_path / "tokenizer")).complete("ROMEO:", seed=2)
    assert load_generator(package).complete("ROMEO:", seed=2) == expected
    with pytest.raises(FileNotFoundError, match="not a trained model directory"):
        load_generator(tmp_path)
