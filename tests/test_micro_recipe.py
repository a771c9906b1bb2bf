"""The micro recipe end to end, shrunk (``--smoke``): every step runs through the package's real data, loading,
training and evaluation paths, and what it writes is what the docs say."""

import json

import pytest
import torch

from transformers import AutoTokenizer

import flamingo
from flamingo.micro.world import KINDS, SYLLABLES, TEST_WORDS, TRAIN_WORDS, binding_episode
from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from flamingo_train.recipes.micro import MicroRecipe, run
from flamingo_train.recipes.micro_backbones import soften_kind_tokens
from flamingo_train.recipes.micro_data import DataRecipe, write_eval_data, write_training_data
from flamingo_train.recipes.texts import ARTICLE, BINDING_PROMPT, KIND_TOKENS, binding_text, kind_token


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


def test_the_recipe_is_deterministic_for_a_seed(smoke_run, tmp_path):
    output, report = smoke_run
    again = run(MicroRecipe.smoke(), tmp_path)
    assert again["trained"] == report["trained"]
    assert again["clip_retrieval_top1"] == report["clip_retrieval_top1"]
    first = flamingo.Flamingo.from_pretrained(output / "flamingo" / "final").state_dict()
    second = flamingo.Flamingo.from_pretrained(tmp_path / "flamingo" / "final").state_dict()
    assert first.keys() == second.keys()
    for key in first:  # bit for bit: backbones (CLIP, LM) and the trained perceiver and cross-attention
        assert torch.equal(first[key], second[key]), key


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


def test_the_lm_reads_binding_in_flamingos_layout_with_a_kind_token_for_the_article(smoke_run):
    # Token by token, the LM's binding text is Flamingo's binding prompt with each " a" replaced by the image's kind
    # token: the one position the cross-attention has to fill from the image.
    output, _ = smoke_run
    tokenizer = AutoTokenizer.from_pretrained(output / "lm")
    episode = binding_episode("train", 3, shots=4)
    lm_ids = tokenizer(binding_text(episode))["input_ids"]
    items = [*episode.demos, (episode.query, episode.answer)]
    flamingo_ids = tokenizer("".join(MEDIA_TOKEN + BINDING_PROMPT.format(word=w) + END_OF_CHUNK_TOKEN
                                     for _, w in items))["input_ids"]
    assert len(lm_ids) == len(flamingo_ids)
    differing = [(a, b) for a, b in zip(lm_ids, flamingo_ids) if a != b]
    (article,) = tokenizer(ARTICLE, add_special_tokens=False)["input_ids"]
    kinds = tokenizer.convert_tokens_to_ids([kind_token(scene) for scene, _ in items])
    assert differing == [(kind, article) for kind in kinds]
    assert len(set(tokenizer.convert_tokens_to_ids(list(KIND_TOKENS)))) == len(KINDS)  # one special token each


def test_soft_kind_tokens_lie_between_the_article_and_the_kind_and_nothing_else_moves():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 7, 9, 7], [9, 1, 7, 2]])
    kind_ids = torch.tensor([7, 9])
    embeddings, article = torch.randn(2, 4, 3), torch.randn(3)
    assert torch.equal(soften_kind_tokens(embeddings, ids, kind_ids, article, share=0.0), embeddings)
    soft = soften_kind_tokens(embeddings, ids, kind_ids, article, share=1.0)
    is_kind = torch.isin(ids, kind_ids)
    assert torch.equal(soft[~is_kind], embeddings[~is_kind])
    # each soft row is u * kind + (1 - u) * article with one u in [0, 1] for all its coordinates
    u = (soft[is_kind] - article) / (embeddings[is_kind] - article)
    assert torch.allclose(u, u[:, :1].expand_as(u), atol=1e-5)
    assert bool(((u >= 0) & (u <= 1)).all()) and not torch.equal(soft[is_kind], embeddings[is_kind])
