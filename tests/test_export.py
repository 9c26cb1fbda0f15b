"""The Hugging Face export against transformers itself: for MHA/GQA/MQA, tied and untied models, and
QK-norm models (as Qwen3), transformers loads without missing or unexpected weights, gives our logits (fp32, 1e-4) and
our greedy generations; AutoTokenizer gives our ids; bad inputs are refused; the CLI, with the model card."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
import yaml
from helpers import MORE_TRICKY, QUIET, build_shards, make_config, random_unicode, write_jsonl

from llm_core.evaluation import evaluate
from llm_core.registry import model_card
from llm_core.model_files import save_model_files
from llm_core.config import load_config
from llm_core.registry.export import export_hf, num_parameters
from llm_core.files import write_json
from llm_core.layout import CLEANED_SHARDS_DIR, DATASET_DIR, LATEST_FILE, MODEL_DIR, RAW_CORPUS_DIR, TOKENIZER_DIR
from llm_core.model import ModelArgs, Transformer
from llm_core.data.tokenizer import EOT, PAD, TOKENIZER_FILE, TRICKY_TEXTS, load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 48
CONFIGS = {  # name: ModelArgs overrides; theta and eps vary so that a wrong mapping shows
    "MHA-tied": {"n_head": 4, "n_kv_head": 4, "tie_embeddings": True},
    "MHA-untied": {"n_head": 4, "n_kv_head": 4, "tie_embeddings": False, "rope_theta": 500.0, "norm_eps": 1e-6},
    "GQA-tied": {"n_head": 4, "n_kv_head": 2, "tie_embeddings": True, "rope_theta": 500.0},
    "GQA-untied": {"n_head": 4, "n_kv_head": 2, "tie_embeddings": False, "norm_eps": 1e-6},
    "MQA-untied-3-layers": {"n_layer": 3, "n_head": 8, "n_kv_head": 1, "tie_embeddings": False,
                            "intermediate_size": 96},
    "QK-norm-GQA-tied": {"n_head": 4, "n_kv_head": 2, "tie_embeddings": True, "qk_norm": True, "norm_eps": 1e-6},
    "QK-norm-MHA-untied-unfused": {"n_head": 4, "n_kv_head": 4, "tie_embeddings": False, "qk_norm": True,
                                   "fused_projections": False, "rope_theta": 500.0},
}




@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, prose):
    """A tokenizer trained by the pipeline's own stages on real prose."""
    root = tmp_path_factory.mktemp("export")
    (root / "src").mkdir()
    write_jsonl(root / "src" / "prose.jsonl", prose)
    cfg = make_config(root / "run", [root / "src"], tokenizer={"vocab_size": 400})
    return train_tokenizer(cfg, build_shards(cfg), root / "tokenizer", log=QUIET).path.parent


def trained_model_dir(path, vocab_size: int, seed: int = 0, **overrides):
    """A model directory as training writes it. Weights (norm gains included) are perturbed off their
    init: a swapped or missing tensor must change the logits, and greedy choices must not be near-ties."""
    args = {"vocab_size": vocab_size, "n_layer": 2, "n_embd": 64, "block_size": BLOCK}
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**args, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.05))
    path.mkdir(parents=True)
    save_model_files(model, load_config(), path)
    return path, model


class TransformersWarnings(logging.Handler):
    """Collects what transformers logs at WARNING and above (its logger does not propagate)."""

    def __enter__(self):
        self.records = []
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.records.append(record.getMessage())


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_dir):
    """name -> (our model, the export loaded by AutoModelForCausalLM, its loading info, warnings, export dir)."""
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    out = {}
    for i, (name, overrides) in enumerate(CONFIGS.items()):
        root = tmp_path_factory.mktemp(name)
        model_dir, ours = trained_model_dir(root / "model", vocab, seed=i, **overrides)
        export_dir = export_hf(model_dir, tokenizer_dir, root / "hf")
        with TransformersWarnings() as caught:
            hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), output_loading_info=True)
        out[name] = ours, hf.eval(), info, caught.records, export_dir
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_loads_every_weight_with_our_config(exports, name):
    ours, hf, info, warnings, export_dir = exports[name]
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert warnings == []
    a, c = ours.args, hf.config
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if ours.args.qk_norm else "LlamaForCausalLM")
    assert hf.dtype == torch.float32
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
           (a.n_embd, a.n_layer, a.n_head, a.n_kv_head, a.head_dim)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == \
           (a.intermediate_size, a.vocab_size, a.block_size)
    assert c.rope_parameters == {"rope_type": "default", "rope_theta": a.rope_theta}
    assert c.rms_norm_eps == a.norm_eps and c.tie_word_embeddings == a.tie_embeddings
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (0, 0, 1)
    # Tied: one tensor in memory, stored once; untied: two.
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == a.tie_embeddings
    assert num_parameters(export_dir) == ours.num_parameters() == hf.num_parameters()
    assert sorted(p.name for p in export_dir.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(exports, name):
    ours, hf, *_ = exports[name]
    x = torch.randint(0, ours.args.vocab_size, (3, BLOCK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = ours(x)
        got = hf(x).logits
    diff = (got - expected).abs().max().item()
    print(f"{name}: max |logit difference| {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_matches_transformers(exports, tokenizer_dir, name):
    """20 greedy tokens each: once with eos (<|endoftext|>) as the stop for both, once with no stop at all,
    so the comparison never ends early on a machine where these random weights pick eos soon."""
    ours, hf, *_ = exports[name]
    tokenizer = load_tokenizer(tokenizer_dir)
    for prompt in ["The quick brown fox", "def f(x):\n    return", "漢字 and emoji 😀"]:
        ids = tokenizer.encode(prompt).ids
        x = torch.tensor([ids])
        for stop in (0, None):
            expected = torch.cat(list(ours.generate(x, 20, temperature=0, stop_token=stop)), dim=1)[0].tolist()
            with TransformersWarnings() as caught:
                got = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20,
                                  eos_token_id=stop)[0, len(ids):]
            assert caught.records == []
            assert got.tolist() == expected, (prompt, stop)
        assert len(expected) == 20  # without a stop: never trivially equal by stopping at once


def test_tokenizer_ids_agree(exports, tokenizer_dir):
    """AutoTokenizer on the export gives our ids, with or without add_special_tokens (nothing is added),
    and decodes them back. A literal "<|endoftext|>" in text is the special token (id 0) for both."""
    export_dir = next(iter(exports.values()))[-1]
    ours = load_tokenizer(tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(str(export_dir))
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token, hf.pad_token_id) == (EOT, 0, PAD, 1)
    assert len(hf) == ours.get_vocab_size() and hf.model_max_length == BLOCK
    texts = TRICKY_TEXTS + MORE_TRICKY + random_unicode(random.Random(2), 50) + ["Once upon a time, 1 + 1 = 2."]
    for text in texts:
        ids = ours.encode(text).ids
        assert hf(text)["input_ids"] == hf(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        assert hf.decode(ids) == ours.decode(ids, skip_special_tokens=False) == text, repr(text)
    assert ours.encode("a<|endoftext|>b").ids[1] == hf("a<|endoftext|>b")["input_ids"][1] == 0


def test_tokenizer_and_generation_files(tokenizer_dir, exports):
    """The export carries the pipeline's tokenizer unchanged; generation stops at <|endoftext|>."""
    export_dir = next(iter(exports.values()))[-1]
    assert json.loads((export_dir / TOKENIZER_FILE).read_text()) == json.loads((tokenizer_dir / TOKENIZER_FILE)
                                                                               .read_text())
    generation = json.loads((export_dir / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


def test_bad_inputs_are_refused(tmp_path, tokenizer_dir):
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    model_dir, _ = trained_model_dir(tmp_path / "model", vocab)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        export_hf(tmp_path / "nowhere", tokenizer_dir, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        export_hf(model_dir, tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="must not be or contain"):
        export_hf(model_dir, tokenizer_dir, tmp_path, overwrite=True)  # would delete the model
    other_vocab, _ = trained_model_dir(tmp_path / "other", vocab + 5)
    with pytest.raises(ValueError, match="not the tokenizer it was trained with"):
        export_hf(other_vocab, tokenizer_dir, tmp_path / "out")
    relu2, _ = trained_model_dir(tmp_path / "relu2", vocab, mlp="relu2")
    with pytest.raises(ValueError, match="model.mlp: relu2 has no transformers architecture"):
        export_hf(relu2, tokenizer_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        export_hf(model_dir, tokenizer_dir, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_hf(model_dir, tokenizer_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "other", "out", "relu2"]  # no temporary left


def test_cli_export_hf(tmp_path, tokenizer_dir, monkeypatch, capsys):
    from pipelines.cli import main

    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    model_dir, _ = trained_model_dir(tmp_path / "model", vocab)
    out = tmp_path / "out"
    assert main(["export-hf", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and str(out) in capsys.readouterr().err
    # A bare model directory (no training summary, no evaluation) still gets a card saying so.
    card = (out / "README.md").read_text()
    assert "Not evaluated" in card and "not recorded (no training_summary.json" in card and "| n_embd | 64 |" in card
    assert main(["export-hf", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out)]) == 2
    refusal = capsys.readouterr().err
    assert "not empty" in refusal and "--overwrite" in refusal  # the flag that replaces it, by name
    assert main(["export-hf", "--model", str(model_dir), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--overwrite"]) == 0

    # Defaults from the profile: the latest trained model and <data_dir>/tokenizer.
    data = tmp_path / "data"
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"data_dir": str(data)}))
    assert main(["export-hf", "--config", str(profile), "--out", str(tmp_path / "out2")]) == 2
    assert "materialize `trained_model`" in capsys.readouterr().err
    (data / MODEL_DIR).mkdir(parents=True)
    (data / MODEL_DIR / LATEST_FILE).write_text(json.dumps({"key": "k", "path": str(model_dir)}))
    (data / "tokenizer").symlink_to(tokenizer_dir)
    assert main(["export-hf", "--config", str(profile), "--out", str(tmp_path / "out2")]) == 0
    assert (tmp_path / "out2" / "tokenizer.json").is_file()


def test_cli_export_writes_the_model_card_of_the_asset(trained, tmp_path, capsys):
    """`scratchllm export-hf` writes the card the hf_export asset writes: the profile's data lineage and,
    for an evaluated training run, its evaluation. Without a report or lineage the card says what is missing."""
    from pipelines.cli import main

    cfg, result, _ = trained
    data = tmp_path / "data"  # the fixture's lineage, with its model as an evaluated training run `k`
    data.mkdir()
    for stage in (RAW_CORPUS_DIR, CLEANED_SHARDS_DIR, DATASET_DIR, TOKENIZER_DIR):
        (data / stage).symlink_to(cfg.data_path / stage)
    run_dir = data / MODEL_DIR / "runs" / "k"
    run_dir.parent.mkdir(parents=True)
    run_dir.symlink_to(result.out_dir)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({"data_dir": str(data), "registry": {"model_name": "tiny"}}))
    report = {"val_bpb": 1.2345, "val_loss": 0.8765, "num_val_documents": 7, "num_val_tokens": 4321, "tasks": []}
    write_json(evaluate.report_path(load_config(profile), "k"), report)

    assert main(["export-hf", "--config", str(profile), "--model", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card == model_card.render(load_config(profile), run_dir, report)  # the asset's card
    assert card.startswith("# tiny\n") and "**1.2345 bits per byte** (loss 0.8765" in card
    assert "Sources (1 file)" in card and "## Tokenizer" in card and "parameters." in card

    # The same weights outside any run directory, with a profile whose data_dir holds nothing.
    (tmp_path / "empty.yaml").write_text(yaml.safe_dump({"data_dir": str(tmp_path / "nothing")}))
    assert main(["export-hf", "--config", str(tmp_path / "empty.yaml"), "--model", str(result.out_dir),
                 "--tokenizer", str(cfg.data_path / TOKENIZER_DIR), "--out", str(tmp_path / "bare")]) == 0
    card = (tmp_path / "bare" / "README.md").read_text()
    assert "Not evaluated" in card and "Not recorded: no `tokenized_dataset` manifest" in card
    assert "## Training" in card and "## Intended use and limits" in card and "README.md" in capsys.readouterr().err
