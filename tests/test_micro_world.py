"""The micro world: deterministic scenes, truthful texts, held-out words and well-formed binding episodes."""

import pytest

from flamingo.micro.world import (
    COLOURS,
    COUNT_WORDS,
    IMAGE_SIZE,
    KINDS,
    SHAPES,
    SIZES,
    SYLLABLES,
    TEST_WORDS,
    TRAIN_WORDS,
    Scene,
    Shape,
    binding_episode,
    captions,
    make_scene,
    pick_question,
    questions,
    render,
    rng_for,
)

WORLD_WORDS = [*COLOURS, *SHAPES, *SIZES, *COUNT_WORDS, "this", "is", "what", "colour", "shape", "size", "the",
               "object", "how", "many", "shapes", "are", "there", "left", "right", "above", "below", "yes", "no"]


def test_items_are_a_function_of_their_key():
    assert make_scene(rng_for("train", "scene", 3)) == make_scene(rng_for("train", "scene", 3))
    assert make_scene(rng_for("train", "scene", 3)) != make_scene(rng_for("test", "scene", 3))
    assert binding_episode("test", 5) == binding_episode("test", 5)
    with pytest.raises(ValueError, match="split must be one of"):
        rng_for("validation", "scene", 0)


def test_scenes_have_distinct_objects_inside_the_canvas():
    for index in range(200):
        scene = make_scene(rng_for("train", "scene", index))
        assert 1 <= len(scene.shapes) <= 3
        assert len({(s.shape, s.colour) for s in scene.shapes}) == len(scene.shapes)
        for s in scene.shapes:
            radius = SIZES[s.size]
            assert radius <= s.x <= IMAGE_SIZE - radius and radius <= s.y <= IMAGE_SIZE - radius


def test_render_draws_each_object_in_its_colour():
    scene = Scene((Shape("square", "red", "large", 16, 32), Shape("circle", "blue", "large", 48, 32)))
    image = render(scene)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    for obj in scene.shapes:
        pixel = image.getpixel((int(obj.x), int(obj.y)))
        assert max(abs(a - b) for a, b in zip(pixel, COLOURS[obj.colour])) < 8, (obj, pixel)
    assert image.getpixel((32, 4))[0] > 230  # background between and above the objects


def test_captions_name_the_objects_and_their_relation():
    a, b = Shape("star", "green", "small", 10, 30), Shape("circle", "red", "large", 50, 34)
    assert captions(Scene((b, a))) == [
        "a small green star to the left of a large red circle",
        "a large red circle to the right of a small green star",
    ]
    above, below = Shape("square", "blue", "small", 30, 10), Shape("square", "red", "small", 30, 50)
    assert set(captions(Scene((below, above)))) == {
        "a small blue square above a small red square", "a small red square below a small blue square"}
    assert captions(Scene((a,))) == ["a small green star"]


def test_questions_are_answered_by_the_scene():
    for index in range(100):
        scene = make_scene(rng_for("train", "scene", index))
        for q in questions(scene, rng_for("train", "question", index)):
            if q.kind == "colour":
                (obj,) = [s for s in scene.shapes if q.question == f"what colour is the {s.shape}?"]
                assert q.answer == obj.colour
            elif q.kind == "shape":
                (obj,) = [s for s in scene.shapes if q.question == f"what shape is the {s.colour} object?"]
                assert q.answer == obj.shape
            elif q.kind == "count":
                assert q.answer == COUNT_WORDS[len(scene.shapes)]
            elif q.kind == "exists":
                named = q.question.removeprefix("is there a ").removesuffix("?")
                assert (q.answer == "yes") == any(f"{s.colour} {s.shape}" == named for s in scene.shapes)
            assert q.answer in WORLD_WORDS


def test_question_kinds_are_mixed_so_no_answer_dominates():
    answers = [pick_question(make_scene(rng_for("train", "scene", i)), rng_for("train", "q", i)).answer
               for i in range(2000)]
    most_common = max(answers.count(a) for a in set(answers))
    assert most_common / len(answers) <= 0.33


def test_word_pools_are_disjoint_and_tokenisable():
    assert TRAIN_WORDS and TEST_WORDS and not set(TRAIN_WORDS) & set(TEST_WORDS)
    for syllable in SYLLABLES:
        assert not any(syllable in other for other in SYLLABLES if other != syllable)
        assert not any(syllable in word for word in WORLD_WORDS), syllable
    assert all(any(w.startswith(s) and w[len(s):] in SYLLABLES for s in SYLLABLES) for w in TRAIN_WORDS + TEST_WORDS)


@pytest.mark.parametrize("split", ["train", "test"])
def test_binding_episodes_bind_two_object_kinds_by_the_demos_only(split):
    pool = TRAIN_WORDS if split == "train" else TEST_WORDS
    looks = set()
    for index in range(100):
        episode = binding_episode(split, index, shots=4)
        word_of = {}
        for scene, word in episode.demos:
            (obj,) = scene.shapes
            assert (obj.colour, obj.shape) in KINDS
            assert word_of.setdefault((obj.colour, obj.shape), word) == word  # one word per kind
            looks.add((obj.colour, obj.shape, obj.size, round(obj.x)))
        assert len(word_of) == 2 and set(word_of.values()) == set(episode.words) <= set(pool)
        words = [w for _, w in episode.demos]
        assert sorted(words[:2]) == sorted(words[2:]) == sorted(episode.words)  # every even prefix is balanced
        (query,) = episode.query.shapes
        assert word_of[(query.colour, query.shape)] == episode.answer
        first = [next(s for s in SYLLABLES if w.startswith(s)) for w in episode.words]
        assert first[0] != first[1]  # the first token already tells the two words apart
    sizes = {size for _, _, size, _ in looks}
    assert sizes == set(SIZES) and len({x for *_, x in looks}) > 20  # a kind's images differ in size and place
