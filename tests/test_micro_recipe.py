"""The micro recipe end to end, shrunk (``--smoke``): every step runs through the package's real data, loading,
training and evaluation paths, and what it writes is what the docs say."""

import json

import pytest
import torch

import flamingo
from flamingo.micro.world import SYLLABLES, TEST_WORDS, TRAIN_WORDS
from flamingo_train.recipes.micro import MicroRecipe, run
from flamingo_train.recipes.micro_data import DataRecipe, write_eval_data, write_training_data


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("micro")
    return output, run(MicroRecipe.smoke(), output)


def test_smoke_recipe_writes_a_loadable_model_and_its_scores(smoke_run):
    output, report = smoke_run
    assert set(report["trained"]) == set(report["untrained_cross_attention"]) == {"caption", "vqa", "binding"}
    for scores in (report["trained"], report["untrained_cross_attention"]):
        for kind, by_shots in scores.items():
            assert sorted(by_shots) == [0, 2], kind
            # percent, as flamingo-eval reports them (CIDEr can exceed 100)
            assert all(0.0 <= value <= (1000.0 if kind == "caption" else 100.0) for value in by_shots.values()), kind
    assert json.loads((output / "results.json").read_text()) == json.loads(json.dumps(report))
    model = flamingo.Flamingo.from_pretrained(output / "flamingo" / "final")
    init = flamingo.Flamingo.from_pretrained(output / "flamingo-init")
    gates = [block.attn_gate.item() for block in model.cross_attn_blocks.values()]
    assert any(g != 0.0 for g in gates)  # trained
    assert all(block.attn_gate.item() == 0.0 for block in init.cross_attn_blocks.values())
    # The LM stayed frozen: every weight of the recipe's LM is unchanged; only the rows Flamingo added for its own
    # tokens (<image>, <|endofchunk|>, past the LM's vocabulary) were trained.
    vocabulary = json.loads((output / "lm" / "config.json").read_text())["vocab_size"]
    trained_lm, init_lm = model.unfuse().state_dict(), init.unfuse().state_dict()
    assert trained_lm.keys() == init_lm.keys()
    for key in trained_lm:
        rows = slice(None, vocabulary) if trained_lm[key].shape[0] > vocabulary else slice(None)
        assert torch.equal(trained_lm[key][rows], init_lm[key][rows]), key
    assert not torch.equal(trained_lm["lm_head.weight"], init_lm["lm_head.weight"])  # the added rows did train


def test_every_nonsense_word_is_two_tokens_of_known_pieces(smoke_run):
    output, _ = smoke_run
    processor = flamingo.FlamingoProcessor.from_pretrained(output / "flamingo" / "final")
    for word in TRAIN_WORDS[:20] + TEST_WORDS[:20]:
        tokens = processor.tokenizer.tokenize(" " + word)
        assert len(tokens) == 2 and tokens[1] in SYLLABLES, (word, tokens)


def test_data_is_deterministic_and_the_held_out_words_are_unseen(tmp_path):
    recipe = DataRecipe(vqa_documents=5, caption_documents=5, interleaved_documents=5, binding_episodes=20,
                        eval_support=4, eval_queries=6)
    first = write_training_data(tmp_path / "a", recipe)
    second = write_training_data(tmp_path / "b", recipe)
    for name in first:
        assert first[name].read_text() == second[name].read_text(), name
    training_text = " ".join(path.read_text() for path in first.values())
    assert not any(f" {word}." in training_text for word in TEST_WORDS)
    eval_dirs = write_eval_data(tmp_path / "eval", recipe)
    episodes = [json.loads(line) for line in (eval_dirs["binding"] / "test.jsonl").read_text().splitlines()]
    assert len(episodes) == 6
    for episode in episodes:
        assert set(episode["choices"]) <= set(TEST_WORDS) and episode["answer"] in episode["choices"]
        assert [d["word"] for d in episode["demos"]][:2] != [episode["choices"][0]] * 2
        assert (eval_dirs["binding"] / episode["image"]).is_file()
