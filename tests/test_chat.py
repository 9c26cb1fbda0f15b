"""Chat fine-tuning's data: the template round trip and its loss mask (hand-checked), the loss on the
assistant's tokens only, conversations checked and quarantined with reasons, the split and the packing,
a base without chat tokens refused, and the shipped conversations file made by its script; a fine-tune
that learns to answer, and the chat champion gated on the same held-out conversations."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from helpers import QUIET
from llm_core.chat import conversations
from llm_core.data import chat_template as template
from llm_core.chat.sft_dataset import build_sft_dataset
from llm_core.config import PROJECT_ROOT, deep_merge, validate_config
from llm_core.data.tokenizer import load_tokenizer
from llm_core.errors import DataError
from llm_core.layout import SFT_DATASET_DIR
from llm_core.training.loader import PackedRows, sequential_batches

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who speaks first?"},
        {"role": "assistant", "content": "First Citizen."}, {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "All."}]


@pytest.fixture(scope="module")
def tokenizer(trained):
    cfg, _, _ = trained
    return load_tokenizer(cfg.data_path / "tokenizer")


def test_the_template_renders_masks_and_parses_back(tokenizer):
    rendered = template.render(tokenizer, CHAT)
    tokenizer.encode_special_tokens = True
    text = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    eot, user, assistant, end = (tokenizer.token_to_id(t) for t in (template.EOT, *template.CHAT_TOKENS))
    first, answer, then, last = text("Be brief.\n\nWho speaks first?"), text("First Citizen."), text("And then?"), \
        text("All.")
    assert rendered.ids == [eot, user, *first, end, assistant, *answer, end, user, *then, end, assistant, *last, end]
    assert rendered.mask == ([0, 0] + [0] * len(first) + [0, 0] + [1] * len(answer) + [1, 0] + [0] * len(then)
                             + [0, 0] + [1] * len(last) + [1])
    assert rendered.assistant_bytes == len("First Citizen.") + len("All.")
    merged = [{"role": "user", "content": "Be brief.\n\nWho speaks first?"}] + CHAT[2:]
    assert template.parse(tokenizer, rendered.ids) == merged
    prompt = template.render(tokenizer, CHAT[:2], add_generation_prompt=True)
    assert prompt.ids[-1] == assistant and prompt.ids == rendered.ids[:len(prompt.ids)]


def test_the_loss_counts_the_assistants_tokens_only(trained, tokenizer):
    _, _, model = trained
    rendered = template.render(tokenizer, CHAT[1:3])  # one round: within the tiny model's 32 tokens
    ids, learned = torch.tensor([rendered.ids]), torch.tensor([rendered.mask]).bool()
    x, y = ids[:, :-1], ids[:, 1:].masked_fill(~learned[:, 1:], -100)
    logits, loss = model(x, y)
    by_hand = torch.nn.functional.cross_entropy(logits[0][learned[0, 1:]], ids[0, 1:][learned[0, 1:]])
    torch.testing.assert_close(loss, by_hand)

    def gradient(targets):
        model.zero_grad(set_to_none=True)
        model(x, targets)[1].backward()
        return [p.grad.clone() for p in model.parameters()]

    other = y.clone()  # the user's turns as targets replaced by other tokens: they are not learned
    other[0, ~learned[0, 1:]] = 5
    assert all(torch.equal(a, b) for a, b in zip(gradient(y), gradient(other.masked_fill(~learned[:, 1:], -100))))
    unmasked = ids[:, 1:].clone()
    assert not all(torch.equal(a, b) for a, b in zip(gradient(y), gradient(unmasked)))  # a mask that matters


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "assistant", "content": "hi"}], "roles must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
    ([{"role": "user", "content": "a"}], "the last turn is the user's"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}], "empty content"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "has role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
    ([{"role": "user", "content": "say <|end|>"}, {"role": "assistant", "content": "b"}], "spells a chat token"),
    ("not a list", "no messages"),
])
def test_a_bad_conversation_has_a_reason(messages, reason):
    assert reason in template.conversation_problem(messages)


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def short_chats(n):
    return [{"messages": [{"role": "user", "content": f"Who says line {i}?"},
                          {"role": "assistant", "content": f"Speaker {i}."}]} for i in range(n)]


def sft_config(cfg, sources, **sft):
    return validate_config(deep_merge(cfg.model_dump(mode="json"),
                                      {"sft": {"sources": [str(s) for s in sources], **sft}}))


def test_sft_dataset_quarantines_splits_and_packs(trained, tokenizer, tmp_path):
    cfg, _, _ = trained
    bad = ["{not json", {"messages": [{"role": "user", "content": "only a question"}]},
           {"messages": [{"role": "user", "content": "long " * 40}, {"role": "assistant", "content": "ok"}]}]
    source = write_jsonl(tmp_path / "chats.jsonl", short_chats(60) + bad + short_chats(3))  # 3 duplicates
    out = tmp_path / SFT_DATASET_DIR
    manifest = build_sft_dataset(sft_config(cfg, [source]), cfg.data_path / "model", "base", out,
                                 tmp_path / "quarantine", log=QUIET)
    counts, splits = manifest["counts"], manifest["splits"]
    assert counts == {"read": 64, "duplicates": 3, "too_long": 1, "quarantined": 3}
    assert splits["train"]["conversations"] + splits["val"]["conversations"] == 60 and splits["val"]["conversations"]
    reasons = [json.loads(line)["reason"] for line in next((tmp_path / "quarantine").glob("*.jsonl")).open()]
    assert [r.split(":")[0] for r in reasons] == ["not JSON", "the last turn is the user's",
                                                  "longer than the context"]
    tokens, mask = np.load(out / "train.tokens.npy"), np.load(out / "train.mask.npy")
    assert tokens.shape[1] == cfg.model.block_size + 1 and mask.sum() == splits["train"]["learned_tokens"]
    eot, pad = tokenizer.token_to_id(template.EOT), manifest["pad_id"]
    for row in tokens:  # whole conversations only, one after another, then padding
        row = row[row != pad]
        starts = list(np.flatnonzero(row == eot)) + [len(row)]
        assert starts[0] == 0
        for start, end in zip(starts, starts[1:]):
            said = template.parse(tokenizer, list(row[start:end]))
            assert [m["role"] for m in said] == ["user", "assistant"] and said[1]["content"].startswith("Speaker")
    # the same conversation lands on the same side in another build, whatever its place in the file
    again = build_sft_dataset(sft_config(cfg, [write_jsonl(tmp_path / "r.jsonl", short_chats(60)[::-1])]),
                              cfg.data_path / "model", "base", tmp_path / "again", tmp_path / "q2", log=QUIET)
    assert again["splits"]["val"]["conversations"] == splits["val"]["conversations"]
    assert (out / "val_conversations.jsonl").read_text() == (tmp_path / "again" / "val_conversations.jsonl").read_text()

    loader = PackedRows(out, "train", batch_size=4, seed=1)
    x, y = loader.batch_at(0)
    assert x.shape == (4, cfg.model.block_size) and ((y == -100) | (y >= 0)).all()
    assert torch.equal(loader.batch_at(3)[0], PackedRows(out, "train", 4, seed=1).batch_at(3)[0])  # (seed, step)
    halves = [PackedRows(out, "train", 2, seed=1, rank=r, world_size=2).batch_at(3)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), loader.batch_at(3)[0])  # 2 ranks see 1 rank's global batch
    val_rows = sum(len(bx) for bx, _ in sequential_batches(out, "val", cfg.model.block_size, 3))
    assert val_rows == splits["val"]["rows"]


def test_a_base_without_chat_tokens_is_refused(trained, tmp_path):
    from tokenizers import trainers

    from llm_core.data.tokenizer import new_tokenizer, save_tokenizer

    cfg, _, _ = trained
    base = tmp_path / "model"  # the trained base's architecture, with a tokenizer made before chat tokens
    base.mkdir()
    (base / "model_config.json").write_text((cfg.data_path / "model" / "model_config.json").read_text())
    plain = new_tokenizer()
    plain.train_from_iterator(["To be, or not to be, that is the question."] * 10,
                              trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"]))
    save_tokenizer(plain, base / "tokenizer", 32)
    source = write_jsonl(tmp_path / "chats.jsonl", short_chats(5))
    with pytest.raises(DataError, match=r"sft.base_model 'old@champion': its tokenizer has no <\|user\|>"):
        build_sft_dataset(sft_config(cfg, [source]), base, "old@champion", tmp_path / "sft", tmp_path / "q")


def test_the_shipped_conversations_are_the_scripts_and_all_usable(tmp_path):
    conversations.main(["--out", str(tmp_path / "made.jsonl")])
    shipped = PROJECT_ROOT / "data" / "conversations.jsonl"
    assert (tmp_path / "made.jsonl").read_bytes() == shipped.read_bytes()
    lines = shipped.read_text().splitlines()
    assert len(lines) == 3000 and all(template.conversation_problem(json.loads(line)["messages"]) is None
                                      for line in lines)


@pytest.fixture(scope="module")
def fine_tuned(data_dir, tmp_path_factory, one_thread):
    """A base with a 64-token context trained briefly on the ci corpus, the shipped conversations as an
    sft_dataset, and the base fine-tuned on them: (sft_dataset dir, base model, fine-tuned model dir)."""
    from helpers import config

    from llm_core.chat.chat_model import chat_training_config
    from llm_core.training.train import train

    root = tmp_path_factory.mktemp("chat")
    base_cfg = validate_config(deep_merge(config(data_dir, max_steps=60).model_dump(mode="json"),
                                          {"model": {"block_size": 64}}))
    train(base_cfg, root / "base", log=QUIET)
    sft_dir = root / SFT_DATASET_DIR
    build_sft_dataset(base_cfg, root / "base", "base", sft_dir, root / "quarantine", log=QUIET)
    chat_cfg = chat_training_config(validate_config(deep_merge(base_cfg.model_dump(mode="json"), {
        "sft": {"max_steps": 150, "batch_size": 16, "learning_rate": 3e-3, "muon_learning_rate": 0.01}})),
        root / "base")
    train(chat_cfg, root / "chat", log=QUIET, dataset_dir=sft_dir)
    return sft_dir, root / "base", root / "chat"


def test_a_fine_tune_learns_to_answer_and_to_end_its_turn(fine_tuned, data_dir):
    from llm_core.chat.chat_model import bits_per_byte, conversation_bits, held_out_prompts, turns_ended
    from llm_core.registry.generate import load_generator

    sft_dir, base_dir, chat_dir = fine_tuned
    tokenizer_dir = data_dir / "tokenizer"
    base, chat = load_generator(base_dir, tokenizer_dir), load_generator(chat_dir, tokenizer_dir)
    before, after = (conversation_bits(g.model, g.tokenizer, sft_dir) for g in (base, chat))
    val = json.loads((sft_dir / "manifest.json").read_text())["splits"]["val"]
    assert before.keys() == after.keys() and len(after) == val["conversations"] > 50
    assert sum(n for _, n, _ in after.values()) == val["assistant_bytes"]
    assert bits_per_byte(after) < bits_per_byte(before) - 1.0, (bits_per_byte(before), bits_per_byte(after))
    prompts = held_out_prompts(sft_dir, limit=100)
    ended_before, ended_after = turns_ended(base, prompts), turns_ended(chat, prompts)
    print(f"assistant bpb {bits_per_byte(before):.3f} -> {bits_per_byte(after):.3f}; "
          f"turns ended {ended_before:.0%} -> {ended_after:.0%}")
    assert ended_after >= 0.9 and ended_before < 0.5, (ended_before, ended_after)
    answer = "".join(chat.reply([{"role": "user", "content": 'Who says: "Speak, speak."'}]))
    assert answer and "<|" not in answer


def test_the_chat_champion_moves_only_to_a_fine_tune_better_on_the_same_conversations(fine_tuned, data_dir,
                                                                                       tmp_path):
    """Gated as base models are: the first chat version is champion; the fine-tune, paired with it on the same
    held-out conversations, takes `champion`; the weaker model registered again after it is the challenger."""
    from helpers import config

    from llm_core import tracking
    from llm_core.chat.chat_model import add_chat_template, against_champion, bits_per_byte, conversation_bits
    from llm_core.registry import versions
    from llm_core.registry.generate import load_generator

    sft_dir, base_dir, chat_dir = fine_tuned
    cfg = config(data_dir).model_copy(update={"data_dir": str(tmp_path / "data")})
    uri = tracking.tracking_uri(cfg)
    tokenizer_dir = tmp_path / "chat_tokenizer"
    shutil.copytree(data_dir / "tokenizer", tokenizer_dir)
    add_chat_template(tokenizer_dir)

    def register(model_dir, key):
        generator = load_generator(model_dir, tokenizer_dir)
        scores = conversation_bits(generator.model, generator.tokenizer, sft_dir)
        verdict = against_champion(cfg, uri, "tiny-chat", key, scores, sft_dir)
        run_id = tracking.start_training_run(cfg, uri, tags={versions.KEY_TAG: key})
        registered = versions.register(model_dir, tokenizer_dir, tracking_uri=uri, run_id=run_id, name="tiny-chat",
                                       val_bpb=bits_per_byte(scores), tags={versions.KEY_TAG: key}, verdict=verdict)
        return registered.alias, verdict

    assert register(base_dir, "weak") == ("champion", None)  # the first version
    alias, verdict = register(chat_dir, "tuned")
    assert alias == "champion" and verdict.promote and verdict.num_documents > 50 and verdict.high < 0, verdict
    alias, verdict = register(base_dir, "weak-again")
    assert alias == "challenger" and not verdict.promote and verdict.low > 0, verdict
    assert "not better beyond the margin" in verdict.reason


def test_a_fine_tune_shorter_than_its_warmup_is_refused_with_the_profile():
    from llm_core.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"sft: .*warmup_steps \(20\) must be below max_steps \(20\)"):
        load_config(None, overrides={"sft": {"max_steps": 20}})
