"""The few-shot evaluation runner and the ``flamingo-eval`` CLI, end to end on a tiny model and fixture data."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import TASKS_WITH_FILES, read_predictions, save_tiny_eval_model, trial_values
from models import build_tiny_model

from flamingo.cross_attention import MaskedCrossAttention
from flamingo.testing import random_images
from flamingo_eval.classification import class_log_probs, class_log_probs_reference
from flamingo_eval.cli import build_parser, config_from_args, main
from flamingo_eval.data import Example, default_layout, load_task_data
from flamingo_eval.demos import ImageEmbedder, RandomDemos, RicesDemos, cached_features
from flamingo_eval.results import ProgressLog, summarize
from flamingo_eval.runner import EvalConfig, Evaluator, MediaCache, load_model
from flamingo_eval.score import score_files
from flamingo_eval.tasks import custom_kinds, get_task, get_task_spec, task_names
from flamingo_eval.testing import write_fixture_data


@pytest.fixture(scope="module")
def model_dir(tiny_vision, tiny_llama_dir, tmp_path_factory):
    return save_tiny_eval_model(tiny_vision, tiny_llama_dir, tmp_path_factory.mktemp("eval_model") / "tiny")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("eval_data"), num_support=6, num_query=5)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir)


# ------------------------------------------------------------------------------------------------ prompts
def _of_vqa(question, answer=None):  # OpenFlamingo's get_vqa_prompt, written out
    end = "<|endofchunk|>" if answer is not None else ""
    return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}{end}"


def _of_caption(caption=None):
    return f"<image>Output:{caption if caption is not None else ''}{'<|endofchunk|>' if caption is not None else ''}"


def _of_hateful(text, label=None):
    return (
        f"<image>is an image with: '{text}' written on it. Is it hateful? Answer:{label if label is not None else ''}"
        f"{'<|endofchunk|>' if label is not None else ''}"
    )


def test_prompts_are_openflamingos_with_newline_after_generation_demos_only():
    image = Path("x.jpg")
    d1, d2 = (
        Example(id=1, image=image, question="What?", answers=("red", "blue")),
        Example(id=2, image=image, question="Who?", answers=("me",)),
    )
    query = Example(id=3, image=image, question="Why?")
    assert get_task_spec("vqav2").prompt([d1, d2], query, zero_shot=False) == (
        _of_vqa("What?", "red") + "\n" + _of_vqa("Who?", "me") + "\n" + _of_vqa("Why?")
    )
    c1 = Example(id=1, image=image, answers=(" A dog. ", "x"))
    assert get_task_spec("coco").prompt([c1], query, zero_shot=False) == _of_caption("A dog.") + "\n" + _of_caption()
    h1, hq = Example(id=1, image=image, text="hi", label=1), Example(id=2, image=image, text="yo", label=0)
    assert get_task_spec("hateful_memes").prompt([h1], hq, zero_shot=False) == _of_hateful("hi", "yes") + _of_hateful(
        "yo"
    )
    imagenet = get_task_spec("imagenet", class_names=["tench", "goldfish"])
    i1, i2 = Example(id="a", image=image, label=1), Example(id="b", image=image, label=0)
    assert (
        imagenet.prompt([i1, i2], i1, zero_shot=False) == _of_caption("goldfish") + _of_caption("tench") + _of_caption()
    )
    assert get_task_spec("textvqa").max_new_tokens == 10 and get_task_spec("vqav2").max_new_tokens == 5
    assert get_task_spec("coco").max_new_tokens == 20 and all(
        get_task_spec(name).num_beams == 3 and get_task_spec(name).length_penalty == 0
        for name in task_names()
        if not custom_kinds(name)  # the named benchmarks
    )


def test_zero_shot_prompt_has_text_only_demos_and_only_the_query_image():
    image = Path("x.jpg")
    demos = [Example(id=i, image=image, question="Q?", answers=("a",)) for i in range(2)]
    prompt = get_task_spec("okvqa").prompt(demos, Example(id=9, image=image, question="Z?"), zero_shot=True)
    assert prompt.count("<image>") == 1 and prompt.endswith(_of_vqa("Z?"))
    assert prompt.count("<|endofchunk|>") == 2


def test_postprocess_cuts_at_the_next_template_word_then_at_the_first_comma():
    vqa, coco = get_task_spec("vqav2"), get_task_spec("coco")
    assert vqa.postprocess(" red, blue Question: what") == "red"
    assert vqa.postprocess(" two Short answer: three") == "two"
    assert coco.postprocess(' a "big" dog, brown\nOutput: a cat') == "a big dog, brown"


def test_custom_task_needs_a_kind_and_takes_the_matching_spec():
    with pytest.raises(ValueError, match="custom_kind"):
        get_task_spec("custom")
    assert get_task_spec("custom", custom_kind="vqa").template == get_task_spec("vqav2").template
    assert get_task_spec("custom", custom_kind="caption").template == get_task_spec("coco").template


# ------------------------------------------------------------------------------------------------ demos
def test_random_demos_depend_only_on_seed_and_query_and_come_from_the_pool():
    support = [Example(id=i, image=Path(f"{i}.jpg")) for i in range(50)]
    a, b = RandomDemos(support, query_set_size=20, seed=1), RandomDemos(support, query_set_size=20, seed=1)
    picks = [[d.id for d in a.select(query_index=q, query=None, k=4)] for q in range(10)]
    # Asked in another order (another batching or process split): the same demos per query.
    assert [[d.id for d in b.select(query_index=q, query=None, k=4)] for q in reversed(range(10))] == picks[::-1]
    pool = {d.id for d in a.pool}
    assert len(pool) == 20 and all(len(set(p)) == 4 and set(p) <= pool for p in picks)
    other = RandomDemos(support, query_set_size=20, seed=2)
    assert [[d.id for d in other.select(query_index=q, query=None, k=4)] for q in range(10)] != picks


def test_rices_picks_the_k_most_similar_with_the_most_similar_last():
    torch.manual_seed(0)
    support = [Example(id=i, image=Path(f"{i}.jpg")) for i in range(12)]
    features = torch.nn.functional.normalize(torch.randn(12, 8), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    rices = RicesDemos(support, features, queries)
    for q in range(3):
        order = sorted(range(12), key=lambda i: float(features[i] @ queries[q]))  # least similar first
        assert [d.id for d in rices.select(query_index=q, query=None, k=3)] == order[-3:]


def test_rices_searches_the_support_features_once_per_block_of_queries_for_every_shot_count():
    # Per query and shot count, a product with the whole (N_support, D) matrix took hours for ImageNet's train set.
    from torch.overrides import TorchFunctionMode

    class CountProducts(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if any(a is support_features or getattr(a, "_base", None) is support_features for a in args):
                CountProducts.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    support = [Example(id=i, image=Path(f"{i}.jpg")) for i in range(40)]
    support_features = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(30, 8), dim=-1)
    rices = RicesDemos(support, support_features, queries, max_k=8)
    with CountProducts():
        picks = {k: [rices.select(query_index=q, query=None, k=k) for q in range(30)] for k in (2, 4, 8)}
    assert CountProducts.count <= 2
    for k, rows in picks.items():
        for q, demos in enumerate(rows):
            order = sorted(range(40), key=lambda i: float(support_features[i] @ queries[q]))
            assert [d.id for d in demos] == order[-k:]


def test_rices_features_embed_each_image_file_once_when_questions_share_images(loaded, data_dir):
    # The VQA fixture has two questions per image, as VQAv2 has five.
    model, processor = loaded
    support = load_task_data("vqav2", data_dir=data_dir).support
    images = [e.image for e in support]
    assert len(set(images)) < len(images)
    embedder = ImageEmbedder.from_flamingo(model, processor)
    calls = []
    embed = embedder.embed
    embedder.embed = lambda paths, **kw: calls.append(len(paths)) or embed(paths, **kw)
    features = cached_features(support, embedder, cache_dir=None)
    assert calls == [len(set(images))] and features.shape[0] == len(support)
    torch.testing.assert_close(features, embed(images))


def test_rices_feature_images_are_decoded_on_several_threads_in_order(loaded, data_dir, monkeypatch):
    # One thread decoding ImageNet's 1.28M training images took hours before the first feature was cached.
    import threading
    import time

    import flamingo_eval.demos as demos

    model, processor = loaded
    monkeypatch.setattr(demos.os, "cpu_count", lambda: 4)
    threads = set()

    def load_image(path):
        threads.add(threading.get_ident())
        time.sleep(0.05)  # long enough that one thread cannot take every image of a batch
        return real_load_image(path)

    real_load_image = demos.load_image
    monkeypatch.setattr(demos, "load_image", load_image)
    support = load_task_data("coco", data_dir=data_dir).support
    embedder = ImageEmbedder.from_flamingo(model, processor)
    features = embedder.embed([e.image for e in support], batch_size=4)
    assert len(threads) > 1
    monkeypatch.setattr(demos, "load_image", real_load_image)
    torch.testing.assert_close(features, torch.cat([embedder.embed([e.image], batch_size=1) for e in support]))


def test_rices_features_are_cached_on_disk_keyed_by_examples_and_encoder(loaded, data_dir, tmp_path):
    model, processor = loaded
    support = load_task_data("coco", data_dir=data_dir).support
    embedder = ImageEmbedder.from_flamingo(model, processor)
    calls = []
    embed = embedder.embed
    embedder.embed = lambda paths, **kw: calls.append(len(paths)) or embed(paths, **kw)
    first = cached_features(support, embedder, cache_dir=tmp_path)
    again = cached_features(support, embedder, cache_dir=tmp_path)
    assert calls == [len(support)] and torch.equal(first, again)
    assert torch.allclose(first.norm(dim=-1), torch.ones(len(support)))
    cached_features(support[:-1], embedder, cache_dir=tmp_path)  # another subset: its own file
    assert calls == [len(support), len(support) - 1] and len(list(tmp_path.glob("rices-*.safetensors"))) == 2


# ------------------------------------------------------------------------------------------------ model paths
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_cached_class_scores_equal_a_full_forward_per_class(tiny_vision, tiny_lm_dir, family):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family))
    a, b, c = random_images(3, seed=3)
    prompts = ["<image>Output:tench<|endofchunk|><image>Output:", "<image>Output:"]  # unequal lengths: left padding
    images = [[a, b], [c]]
    media = model.encode_media(processor.preprocess_images(images))
    names = ["tench", "goldfish", "great white shark", "a b c"]  # multi-token names of different lengths
    cached = class_log_probs(
        model, processor.tokenizer, prompts=prompts, media=media, class_names=names, class_batch_size=3
    )
    plain = class_log_probs_reference(model, processor, prompts=prompts, images=images, class_names=names)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    # The class tokens really see the query image: another image changes the scores.
    other = model.encode_media(processor.preprocess_images([[a, c], [b]]))
    changed = class_log_probs(model, processor.tokenizer, prompts=prompts, media=other, class_names=names)
    assert not torch.allclose(changed, cached)


@pytest.mark.parametrize("immediate", [True, False])
def test_class_chunks_carry_only_the_query_image_when_tokens_attend_to_it_alone(
    tiny_vision, tiny_lm_dir, immediate, monkeypatch
):
    # 1000 classes at 32 shots: every (sample, class) row once carried all 33 images' latents through the blocks.
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir("llama"), immediate=immediate)
    a, b, c = random_images(3, seed=4)
    prompts = ["<image>Output:tench<|endofchunk|><image>Output:", "<image>Output:"]
    images = [[a, b], [c]]
    media = model.encode_media(processor.preprocess_images(images))
    names = ["tench", "goldfish", "great white shark"]
    slots, projections = [], []
    forward, keys_values = model.forward, MaskedCrossAttention.keys_values

    def recorded_forward(*args, **kw):
        state = kw.get("media_state")
        slots.append(kw["media"].shape[1] if state is None else state.media.shape[1])
        return forward(*args, **kw)

    monkeypatch.setattr(model, "forward", recorded_forward)
    monkeypatch.setattr(
        MaskedCrossAttention, "keys_values", lambda attn, media: projections.append(media.shape) or keys_values(attn, media)
    )
    cached = class_log_probs(model, processor.tokenizer, prompts=prompts, media=media, class_names=names, class_batch_size=1)
    monkeypatch.undo()
    # The images' keys/values are projected once per block, for the prompt; the 3 class chunks reuse them.
    assert len(projections) == len(model.cross_attn_blocks)
    assert slots == [2] + [1 if immediate else 2] * 3  # the prompt, then the class chunks
    plain = class_log_probs_reference(model, processor, prompts=prompts, images=images, class_names=names)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)


def test_generation_follows_the_protocol_not_the_language_models_own_generation_config(loaded, data_dir):
    # Instruct LMs ship generation_config.json with repetition_penalty, no_repeat_ngram_size, min_new_tokens...;
    # HF generate applied them on top of the protocol's 3 beams, silently changing every answer.
    from flamingo_eval.generation import generate_answers

    model, processor = loaded
    spec = get_task_spec("vqav2")
    query = load_task_data("vqav2", data_dir=data_dir).query[:2]
    prompts = [spec.prompt([], q, zero_shot=False) for q in query]
    media = MediaCache(model, processor).media([[q.image] for q in query])
    plain = generate_answers(model, processor.tokenizer, prompts=prompts, media=media, spec=spec)
    saved = model.lang_model.generation_config
    model.lang_model.generation_config = tuned_config = copy.deepcopy(saved)
    seen_during_the_call = []
    original_generate = model.lang_model.generate

    def generate(*args, **kwargs):  # what a second thread sharing the model would see meanwhile
        seen_during_the_call.append(model.lang_model.generation_config)
        return original_generate(*args, **kwargs)

    try:
        model.lang_model.generation_config.update(
            no_repeat_ngram_size=1, min_new_tokens=5, repetition_penalty=5.0, do_sample=True, top_k=2
        )
        model.lang_model.generate = generate
        tuned = generate_answers(model, processor.tokenizer, prompts=prompts, media=media, spec=spec)
    finally:
        del model.lang_model.generate
        model.lang_model.generation_config = saved
    assert tuned == plain
    assert seen_during_the_call == [tuned_config] and seen_during_the_call[0] is tuned_config  # never swapped


def test_a_language_model_setting_with_no_neutral_value_is_refused_by_name(loaded):
    from flamingo.generation import exact_generation_config

    model, _ = loaded
    lm = copy.copy(model.lang_model)
    lm.generation_config = copy.deepcopy(model.lang_model.generation_config)
    lm.generation_config.update(forced_bos_token_id=3)
    with pytest.raises(ValueError, match="generation_config sets forced_bos_token_id=3"):
        exact_generation_config(lm, num_beams=3)


def test_a_generation_that_uses_every_new_token_without_a_stop_is_truncated_and_warned_once(loaded, data_dir):
    from flamingo_eval.generation import TRUNCATION_WARNING, count_truncated, generate_answers

    model, processor = loaded
    tokenizer = processor.tokenizer
    eoc = model.config.end_of_chunk_token_id
    word = tokenizer("red", add_special_tokens=False).input_ids[:1]
    stop_word = tokenizer("red Question", add_special_tokens=False).input_ids  # cut by postprocess: not truncated
    comma = tokenizer("red, blue", add_special_tokens=False).input_ids  # VQA cuts at ", ": not truncated either
    width = max(len(stop_word), len(comma), 3)
    rows = [word * width, word + [eoc] * (width - 1), stop_word + word * (width - len(stop_word)),
            comma + word * (width - len(comma))]
    new_tokens = torch.tensor(rows)

    def scripted(input_ids, **kwargs):
        return torch.cat([input_ids, new_tokens.to(input_ids.device)], dim=1)

    query = load_task_data("vqav2", data_dir=data_dir).query[:4]
    spec = dataclasses.replace(get_task_spec("vqav2"), max_new_tokens=width)
    prompts = [spec.prompt([], q, zero_shot=False) for q in query]
    model.generate = scripted
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            answers = generate_answers(model, tokenizer, prompts=prompts, media=None, spec=spec)
            again = generate_answers(model, tokenizer, prompts=prompts, media=None, spec=spec)
        # The same rows with budget to spare: they ended before max_new_tokens ran out.
        roomy = generate_answers(model, tokenizer, prompts=prompts, media=None,
                                 spec=dataclasses.replace(spec, max_new_tokens=width + 1))
    finally:
        del model.generate
    assert [a["truncated"] for a in answers] == [True, False, False, False] and again == answers
    assert [a["prediction"] for a in answers[2:]] == ["red", "red"]
    assert sum(TRUNCATION_WARNING in str(w.message) for w in caught) == 1
    assert not any(a["truncated"] for a in roomy)
    assert count_truncated(answers + again) == 2 and count_truncated([{"prediction": 1}]) is None


def test_custom_runs_report_truncations_and_the_vqa_rule_and_take_max_new_tokens_from_the_answers(loaded, tmp_path):
    model, processor = loaded
    tokenizer = processor.tokenizer
    root = write_fixture_data(tmp_path / "data", tasks=("custom",), num_support=3, num_query=3)
    test = root / "custom" / "test.jsonl"
    records = [json.loads(line) for line in test.read_text().splitlines()]
    records[0]["answers"] = ["the small red ball to the left of the big blue box"]  # one answer, many tokens
    test.write_text("".join(json.dumps(r) + "\n" for r in records))
    longest = max(len(tokenizer(a, add_special_tokens=False).input_ids) for r in records for a in r["answers"])
    assert longest + 2 > get_task_spec("vqav2").max_new_tokens  # the data's budget differs from the default
    filler = tokenizer("red", add_special_tokens=False).input_ids[0]
    budgets = []

    def never_stops(input_ids, *, generation_config, **kwargs):
        max_new_tokens = generation_config.max_new_tokens  # generate_answers passes its decoding per call
        budgets.append(max_new_tokens)
        return torch.cat([input_ids, input_ids.new_full((input_ids.shape[0], max_new_tokens), filler)], dim=1)

    model.generate = never_stops
    trials = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for max_new_tokens in (None, 3):  # the data's budget, then the user's
                config = EvalConfig(model=None, tasks=["custom"], custom_kind="vqa", shots=[0, 1], data_dir=root,
                                    batch_size=2, max_new_tokens=max_new_tokens,
                                    output=tmp_path / f"{max_new_tokens}.json")
                Evaluator(config, model=model, processor=processor).run()
                trials[max_new_tokens] = json.loads(config.output.read_text())["trials"]
    finally:
        del model.generate
    assert budgets == [longest + 2] * 4 + [3] * 4  # 2 batches x 2 shot counts per run
    from flamingo_eval.generation import TRUNCATION_WARNING

    assert sum(TRUNCATION_WARNING in str(w.message) for w in caught) == 1  # 8 truncated batches, one warning
    for trial in trials[None] + trials[3]:
        assert trial["truncated"] == trial["num_queries"] == 3
        assert trial["vqa_rule"] == "mixed" and trial["vqa_rule_counts"] == {"exact-match-any": 1, "official-10": 2}


def test_zero_shot_text_demos_flag_defaults_to_the_tasks_and_zero_leaves_the_query_alone(
    loaded, data_dir, tmp_path, monkeypatch
):
    from flamingo_eval.kinds import Vqa

    argv = ["run", "--model", "m", "--tasks", "vqav2"]
    assert config_from_args(build_parser().parse_args(argv)).zero_shot_text_demos is None
    assert config_from_args(build_parser().parse_args([*argv, "--zero-shot-text-demos", "0"])).zero_shot_text_demos == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--zero-shot-text-demos", "-1"])
    model, processor = loaded
    prompts = []
    predict = Vqa.predict
    monkeypatch.setattr(Vqa, "predict", lambda self, *a, **kw: prompts.append(kw["prompts"]) or predict(self, *a, **kw))
    query = load_task_data("vqav2", data_dir=data_dir).query
    for demos in (None, 0, 1):
        config = EvalConfig(model=None, tasks=["vqav2"], shots=[0], data_dir=data_dir, batch_size=len(query),
                            max_new_tokens=1, zero_shot_text_demos=demos, output=tmp_path / f"{demos}.json")
        Evaluator(config, model=model, processor=processor).run()
    default, off, one = prompts
    assert all(p.count("<|endofchunk|>") == 2 and p.count("<image>") == 1 for p in default)  # OpenFlamingo's
    assert off == [get_task_spec("vqav2").query_text(q) for q in query]  # no demo text at all
    assert all(p.count("<|endofchunk|>") == 1 and p.count("<image>") == 1 for p in one)


def test_media_cache_encodes_each_distinct_image_once_and_equals_fresh_encoding(loaded, data_dir):
    model, processor = loaded
    paths = [e.image for e in load_task_data("coco", data_dir=data_dir).support]
    lists = [[paths[0], paths[1], paths[2]], [paths[1], paths[3]], [paths[0], paths[2], paths[3]]]
    cache, fresh = MediaCache(model, processor), MediaCache(model, processor, enabled=False)
    first, second = cache.media(lists), cache.media(lists[::-1])
    assert cache.encoded == 4  # four distinct files over both calls
    torch.testing.assert_close(first, fresh.media(lists), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, first[[2, 1, 0]])
    assert torch.count_nonzero(first[1, 2]) == 0  # the second sample's third slot is padding


def test_media_cache_keeps_images_in_use_when_it_evicts(loaded, data_dir):
    # Least recently used goes first, never an image of the batch being built: a full cache (a 2048-image demo pool
    # plus thousands of queries) once raised KeyError for a pool image encoded early and evicted by the new queries.
    model, processor = loaded
    paths = [e.image for e in load_task_data("coco", data_dir=data_dir).support]
    cache = MediaCache(model, processor, max_items=3)
    cache.media([[paths[0], paths[1], paths[2]]])
    batch = [[paths[0], paths[3], paths[4]]]
    media = cache.media(batch)  # paths[0] was the oldest entry; the two new images evict
    torch.testing.assert_close(media, MediaCache(model, processor, enabled=False).media(batch))
    assert cache.encoded == 5
    cache.media([[paths[0], paths[5]]])  # paths[0] was used last call, so paths[3] goes, not it
    assert cache.encoded == 6 and str(paths[0]) in cache._latents and str(paths[3]) not in cache._latents
    cache.media([[paths[0], paths[1], paths[2], paths[3]]])  # a batch larger than the whole cache still works
    # Each entry owns its memory: evicting it frees it (a view would pin its whole encoding chunk).
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in cache._latents.values())


# ------------------------------------------------------------------------------------------------ end to end
def _annotations(task: str, data_dir: Path) -> tuple[Path, Path | None]:
    """The official annotation (and questions) files that score_files reads for ``task``'s query split."""
    layout = default_layout(task, data_dir)
    if task in ("vqav2", "okvqa"):
        return layout["test_annotations"], layout["test_questions"]
    key = {
        "coco": "karpathy_json",
        "flickr30k": "karpathy_json",
        "textvqa": "test_json",
        "vizwiz": "test_json",
        "hateful_memes": "test_jsonl",
    }[task]
    return layout[key], None


@pytest.mark.parametrize("rices", [False, True], ids=["random", "rices"])
def test_every_task_runs_end_to_end_at_0_and_2_shots(model_dir, data_dir, tmp_path, capsys, rices):
    out, preds = tmp_path / "results.json", tmp_path / "preds"
    common = [
        "--model",
        str(model_dir),
        "--shots",
        "0",
        "2",
        "--data-dir",
        str(data_dir),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "4",
    ] + (["--rices"] if rices else [])
    assert (
        main(["run", "--tasks", *TASKS_WITH_FILES, *common, "--output", str(out), "--predictions-dir", str(preds)]) == 0
    )
    table = capsys.readouterr().out
    values = trial_values(out)
    assert set(values) == {(t, k, 42, rices) for t in TASKS_WITH_FILES for k in (0, 2)}
    assert all(v is not None and 0 <= v <= 100 for v in values.values())
    assert all(f"| {t} (" in table for t in TASKS_WITH_FILES)
    suffix = "-rices" if rices else ""
    for task in TASKS_WITH_FILES:
        records = json.loads((preds / f"{task}-2shot-seed42{suffix}.json").read_text())
        assert len(records) == len(load_task_data(task, data_dir=data_dir).query)
        if task != "imagenet":  # the official-format file scores to the value the runner reported
            annotations, questions = _annotations(task, data_dir)
            scores = score_files(task, preds / f"{task}-2shot-seed42{suffix}.json", annotations, questions)
            score = scores[get_task(task).kind.metric]
            assert score == pytest.approx(values[(task, 2, 42, rices)])
    for kind in ("caption", "vqa"):
        custom_out = tmp_path / f"custom-{kind}.json"
        assert main(["run", "--tasks", "custom", "--custom-kind", kind, *common, "--output", str(custom_out)]) == 0
        assert set(trial_values(custom_out)) == {("custom", k, 42, rices) for k in (0, 2)}


def interrupt_after_logged_batches(monkeypatch, stop):
    """Make the runner raise ``stop(progress_log)``'s exception (if it returns one) right after a batch is logged, as a
    kill or Ctrl-C at that moment would; the batch's line is on disk, so a rerun resumes after it."""
    append = ProgressLog.append

    def append_then_maybe_stop(log, batch, records):
        append(log, batch, records)
        error = stop(log)
        if error is not None:
            raise error

    monkeypatch.setattr(ProgressLog, "append", append_then_maybe_stop)


def test_resumed_run_skips_finished_batches_and_equals_an_uninterrupted_run(loaded, data_dir, tmp_path, monkeypatch):
    model, processor = loaded

    def config(name):
        return EvalConfig(
            model=None,
            tasks=["vqav2", "hateful_memes"],
            shots=[2],
            seeds=[7],
            data_dir=data_dir,
            batch_size=2,
            max_new_tokens=3,
            output=tmp_path / name / "results.json",
            predictions_dir=tmp_path / name / "preds",
        )

    full = Evaluator(config("full"), model=model, processor=processor)
    full.run()
    total = full.batches_computed
    assert total == 6  # 5 queries in batches of 2, for each of the two tasks

    class Interrupt(Exception):
        pass

    logged = []

    def stop_after_two(log):
        logged.append(log.name)
        return Interrupt() if len(logged) == 2 else None

    with monkeypatch.context() as patch:
        interrupt_after_logged_batches(patch, stop_after_two)
        with pytest.raises(Interrupt):
            Evaluator(config("resumed"), model=model, processor=processor).run()
    resumed = Evaluator(config("resumed"), model=model, processor=processor)
    calls = []
    generate = model.generate
    model.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    try:
        resumed.run()
    finally:
        del model.generate
    assert resumed.batches_computed == total - 2 and len(calls) == 3 - 2  # vqav2's first two batches were logged
    assert read_predictions(tmp_path / "resumed" / "preds") == read_predictions(tmp_path / "full" / "preds")
    assert trial_values(tmp_path / "resumed" / "results.json") == trial_values(tmp_path / "full" / "results.json")


def test_an_interrupted_run_leaves_results_marked_incomplete_with_the_missing_trials(
    loaded, data_dir, tmp_path, monkeypatch
):
    model, processor = loaded
    config = EvalConfig(model=None, tasks=["vqav2", "hateful_memes"], shots=[2], seeds=[7], data_dir=data_dir,
                        batch_size=2, max_new_tokens=3, output=tmp_path / "results.json")

    def ctrl_c_in_the_second_task(log):
        return KeyboardInterrupt() if log.name.startswith("hateful_memes-") else None

    with monkeypatch.context() as patch:
        interrupt_after_logged_batches(patch, ctrl_c_in_the_second_task)
        with pytest.raises(KeyboardInterrupt):
            Evaluator(config, model=model, processor=processor).run()
    partial = json.loads(config.output.read_text())
    assert partial["complete"] is False
    assert partial["missing"] == [{"task": "hateful_memes", "shots": 2, "seed": 7}]
    assert [t["task"] for t in partial["trials"]] == ["vqav2"]

    finished = Evaluator(config, model=model, processor=processor).run()  # the rerun finishes from the progress logs
    assert finished["complete"] is True and finished["missing"] == []
    assert json.loads(config.output.read_text())["complete"] is True


def test_progress_log_after_a_kill_mid_write_stays_readable_for_later_resumes(tmp_path):
    log = ProgressLog(tmp_path, name="t", rank=0)
    log.append(0, [{"index": 0}])
    with open(log.path, "a") as f:
        f.write('{"batch": 1, "rec')  # the process was killed while writing batch 1
    assert set(log.load()) == {0}
    log.append(1, [{"index": 1}])  # the resumed run redoes batch 1 ...
    log.append(2, [{"index": 2}])
    # ... and a third run (more shots, another kill) still reads every finished batch.
    assert ProgressLog(tmp_path, name="t", rank=0).load() == {0: [{"index": 0}], 1: [{"index": 1}], 2: [{"index": 2}]}
    with open(log.path, "a") as f:
        f.write('{"batch": 3, "records": [{"index": 3}]}')  # killed just before the newline: batch 3 is complete
    log.append(4, [{"index": 4}])
    assert sorted(ProgressLog(tmp_path, name="t", rank=0).load()) == [0, 1, 2, 3, 4]


def test_predictions_are_written_even_when_the_metric_is_undefined(loaded, data_dir, tmp_path):
    # One HatefulMemes query has one label, so ROC-AUC is undefined: the error is raised, the outputs are kept.
    model, processor = loaded
    config = EvalConfig(
        model=None, tasks=["hateful_memes"], shots=[0], seeds=[1], data_dir=data_dir, num_samples=1,
        output=tmp_path / "results.json", predictions_dir=tmp_path / "preds",
    )
    with pytest.raises(ValueError, match="roc_auc is undefined"):
        Evaluator(config, model=model, processor=processor).run()
    (records,) = read_predictions(tmp_path / "preds").values()
    assert len(records) == 1 and 0 <= records[0]["score"] <= 1


def _subprocess_env():
    # One thread per process: the same float reductions in the 1- and 2-process runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_two_process_run_equals_one_process_run(model_dir, data_dir, tmp_path):
    args = [
        "run",
        "--model",
        str(model_dir),
        "--tasks",
        "vqav2",
        "hateful_memes",
        "--shots",
        "2",
        "--rices",
        "--data-dir",
        str(data_dir),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
    ]
    bin_dir = Path(sys.executable).parent
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each of the two processes: the same float reductions
    try:
        assert main([*args, "--output", str(tmp_path / "one.json"), "--predictions-dir", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    # accelerate's --cpu launcher starts a single process; --multi_gpu starts torchrun workers, which join one gloo
    # group on a CPU-only machine.
    two = subprocess.run(
        [
            str(bin_dir / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "flamingo_eval",
            *args,
            "--output",
            str(tmp_path / "two.json"),
            "--predictions-dir",
            str(tmp_path / "two"),
        ],
        env=_subprocess_env(),
        check=False,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    progress = sorted(p.name.split(".")[-2] for p in (tmp_path / "two.json.progress").glob("*.jsonl"))
    assert set(progress) == {"rank0", "rank1"}  # both processes really evaluated batches
    assert read_predictions(tmp_path / "two") == read_predictions(tmp_path / "one")
    assert trial_values(tmp_path / "two.json") == trial_values(tmp_path / "one.json")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_reports_a_missing_data_file_by_name_with_a_nonzero_exit(model_dir, data_dir, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(data_dir / "coco", broken / "coco")
    (broken / "coco" / "dataset_coco.json").unlink()
    args = ["run", "--model", str(model_dir), "--tasks", "coco", "--data-dir", str(broken)]
    args += ["--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert "dataset_coco.json" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_cli_reports_a_malformed_record_by_file_and_field(model_dir, data_dir, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(data_dir / "vqav2", broken / "vqav2")
    questions = broken / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    data = json.loads(questions.read_text())
    del data["questions"][1]["question"]
    questions.write_text(json.dumps(data))
    code = main(
        [
            "run",
            "--model",
            str(model_dir),
            "--tasks",
            "vqav2",
            "--data-dir",
            str(broken),
            "--output",
            str(tmp_path / "r.json"),
        ]
    )
    error = capsys.readouterr().err
    assert code != 0 and str(questions) in error and "'question'" in error


@pytest.mark.parametrize(
    "args, message",
    [
        (["--path", "coco-karpathy_json=x"], "TASK.KEY=FILE"),
        (["--tasks", "custom"], "--custom-kind"),
        (["--seeds", "1", "--trials", "2"], "--trials 2"),
    ],
)
def test_cli_rejects_inconsistent_flags_with_a_message(model_dir, data_dir, tmp_path, capsys, args, message):
    base = {"--tasks": ["coco"]}
    argv = ["run", "--model", str(model_dir), "--data-dir", str(data_dir), "--output", str(tmp_path / "r.json")]
    argv += args + ([] if "--tasks" in args else ["--tasks", *base["--tasks"]])
    assert main(argv) != 0 and message in capsys.readouterr().err


def test_cli_reports_a_missing_model_directory(data_dir, tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path / "nope"), "--tasks", "coco", "--data-dir", str(data_dir)]) != 0
    assert str(tmp_path / "nope") in capsys.readouterr().err


def test_score_subcommand_prints_the_score_files_result_as_json(data_dir, tmp_path, capsys):
    query = load_task_data("vqav2", data_dir=data_dir).query
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps([{"question_id": e.id, "answer": e.answers[i % 2]} for i, e in enumerate(query)]))
    annotations, questions = _annotations("vqav2", data_dir)
    argv = [
        "score",
        "--task",
        "vqav2",
        "--predictions",
        str(predictions),
        "--annotations",
        str(annotations),
        "--questions",
        str(questions),
    ]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == score_files("vqav2", predictions, annotations, questions)


def test_summary_reports_mean_and_population_std_over_trials():
    trials = [{"task": "coco", "shots": 4, "metric": "cider", "value": v} for v in (10.0, 20.0, 33.0)]
    trials.append({"task": "vqav2", "shots": 0, "metric": "accuracy", "value": None})  # unscored: left out
    (row,) = summarize(trials)
    assert row["mean"] == statistics.fmean([10.0, 20.0, 33.0]) and row["std"] == statistics.pstdev([10.0, 20.0, 33.0])
    assert row["trials"] == 3


def test_a_split_without_answers_writes_predictions_and_reports_no_score(loaded, data_dir, tmp_path):
    model, processor = loaded
    config = EvalConfig(
        model=None,
        tasks=["vqav2"],
        shots=[0],
        data_dir=data_dir,
        paths={"vqav2": {"test_annotations": ""}},
        batch_size=5,
        max_new_tokens=2,
        output=tmp_path / "r.json",
        predictions_dir=tmp_path / "p",
    )
    results = Evaluator(config, model=model, processor=processor).run()
    (trial,) = results["trials"]
    assert trial["value"] is None and results["summary"] == []
    records = json.loads(Path(trial["predictions"]).read_text())  # a test-dev style export, ready for EvalAI
    assert [r["question_id"] for r in records] == [e.id for e in load_task_data("vqav2", data_dir=data_dir).query]


def test_num_samples_evaluates_a_seeded_subset_of_the_queries(loaded, data_dir, tmp_path):
    model, processor = loaded
    config = EvalConfig(
        model=None,
        tasks=["hateful_memes"],
        shots=[0],
        seeds=[0, 1],
        data_dir=data_dir,
        num_samples=3,
        output=tmp_path / "r.json",
        predictions_dir=tmp_path / "p",
    )
    results = Evaluator(config, model=model, processor=processor).run()
    query = load_task_data("hateful_memes", data_dir=data_dir).query
    for trial in results["trials"]:
        expected = sorted(np.random.default_rng(trial["seed"]).choice(len(query), size=3, replace=False))
        records = json.loads(Path(trial["predictions"]).read_text())
        assert trial["num_queries"] == 3 and [r["id"] for r in records] == [query[i].id for i in expected]
