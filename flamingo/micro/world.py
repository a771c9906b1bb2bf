"""The micro world: scenes of 1-3 coloured shapes, rendered with PIL, and the texts the micro model learns from them.

Everything is a deterministic function of (split, kind, index), so the recipe (``flamingo_train.recipes.micro``),
the demo and the notebooks all see the same scenes: :func:`rng_for` seeds Python's ``random`` with that key, and
``"train"`` and ``"test"`` keys never meet, so no held-out scene is trained on.

Texts (all lower case, word-level, so a tiny tokenizer covers them):

* captions: ``"a small red circle to the left of a large blue square"``; every valid phrasing is a reference;
* questions with short answers (colour, shape, size, count, "is there ...?", left/right), see :func:`questions`;
* binding episodes (:func:`binding_episode`): nonsense words such as ``"dax"`` bound to two object kinds (a shape in
  a colour, ``KINDS``) by the demos only, as in the Frozen and Flamingo papers. Words come from ``TRAIN_WORDS`` or
  ``TEST_WORDS`` (disjoint pools).

Example::

    scene = make_scene(rng_for("test", "scene", 7))
    image = render(scene)            # 64 x 64 RGB PIL image
    captions(scene)                  # ['a large green star above a small red circle', ...]
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (230, 195, 25),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# The categories of binding episodes: an object kind is a shape in a colour ("a red star"); size and position vary.
KINDS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
SIZES = {"small": 7.0, "large": 11.5}  # radius in pixels at IMAGE_SIZE
COUNT_WORDS = ("zero", "one", "two", "three")
BACKGROUND = (244, 244, 240)

SPLITS = ("train", "test")

# No syllable is part of another or of any other word of the world, so a tokenizer can keep each one a token.
SYLLABLES = ("da", "ke", "bli", "fep", "zu", "wug", "gor", "sna", "pim", "vex", "ru", "nal", "quo", "tup", "jov", "hib")


def _word_pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Two-syllable nonsense words, split 3:1 into disjoint train and test pools. The pools share syllables, so a
    test word is made of tokens the LM knows, but as a word it never appears in training."""
    words = [a + b for a, b in itertools.permutations(SYLLABLES, 2)]
    random.Random("flamingo-micro/words").shuffle(words)
    cut = 3 * len(words) // 4
    return tuple(sorted(words[:cut])), tuple(sorted(words[cut:]))


TRAIN_WORDS, TEST_WORDS = _word_pools()


def _first_syllable(word: str) -> str:
    return next(s for s in SYLLABLES if word.startswith(s))


def rng_for(split: str, kind: str, index: int) -> random.Random:
    """The random generator of item ``index`` of ``kind`` in ``split``: the same on every machine and Python run."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}.")
    return random.Random(f"flamingo-micro/{split}/{kind}/{index}")


@dataclass(frozen=True)
class Shape:
    """One object: its shape, colour and size, and its centre in pixels (x right, y down)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    def phrase(self, *, with_size: bool = True) -> str:
        return f"a {self.size + ' ' if with_size else ''}{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]


def _place(rng: random.Random, radii: list[float]) -> list[tuple[float, float]] | None:
    """Centres for objects of these radii, inside the canvas, apart from each other; for two objects the offset is
    clearly horizontal or clearly vertical, so "left of" / "above" is never ambiguous."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        for _ in range(100):
            x = rng.uniform(radius + 2, IMAGE_SIZE - radius - 2)
            y = rng.uniform(radius + 2, IMAGE_SIZE - radius - 2)
            if all((x - cx) ** 2 + (y - cy) ** 2 > (radius + r + 3) ** 2 for (cx, cy), r in zip(centres, radii)):
                centres.append((x, y))
                break
        else:
            return None
    if len(centres) == 2:
        dx, dy = abs(centres[0][0] - centres[1][0]), abs(centres[0][1] - centres[1][1])
        if max(dx, dy) < 1.5 * min(dx, dy) + 4:
            return None
    return centres


def make_scene(rng: random.Random, *, num_shapes: int | None = None, shape: str | None = None,
               colour: str | None = None) -> Scene:
    """A scene of 1-3 objects (or ``num_shapes``), distinct in (shape, colour); ``shape`` and ``colour`` fix the first
    object's (binding episodes use one-object scenes of a given kind)."""
    count = num_shapes or rng.choice((1, 2, 2, 3))
    while True:
        kinds = set()
        objects = []
        for index in range(count):
            first = index == 0
            kind = (shape if first and shape else rng.choice(SHAPES),
                    colour if first and colour else rng.choice(tuple(COLOURS)))
            if kind in kinds:
                break
            kinds.add(kind)
            objects.append((kind, rng.choice(tuple(SIZES))))
        else:
            centres = _place(rng, [SIZES[size] for _, size in objects])
            if centres is not None:
                shapes = tuple(
                    Shape(kind[0], kind[1], size, x, y) for (kind, size), (x, y) in zip(objects, centres)
                )
                return Scene(shapes)


def _polygon(kind: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if kind == "diamond":
        return [(x, y - r), (x + r * 0.75, y), (x, y + r), (x - r * 0.75, y)]
    if kind == "triangle":
        return [(x + r * math.cos(a), y + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        points = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            radius = r if i % 2 == 0 else r * 0.45
            points.append((x + radius * math.cos(a), y + radius * math.sin(a)))
        return points
    raise ValueError(f"unknown shape {kind!r}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image (drawn at 4x and downsampled, for smooth edges)."""
    scale = 4 * size / IMAGE_SIZE
    image = Image.new("RGB", (4 * size, 4 * size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.shapes:
        x, y, r = obj.x * scale, obj.y * scale, SIZES[obj.size] * scale
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.polygon(_polygon(obj.shape, x, y, r), fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _relation(a: Shape, b: Shape) -> str:
    """Where ``a`` is relative to ``b`` (the scene generator keeps one axis dominant)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def captions(scene: Scene) -> list[str]:
    """Every reference caption of the scene; the first is the canonical one (objects from left to right)."""
    objects = sorted(scene.shapes, key=lambda s: s.x)
    if len(objects) == 1:
        return [objects[0].phrase()]
    if len(objects) == 2:
        a, b = objects
        return [f"{a.phrase()} {_relation(a, b)} {b.phrase()}", f"{b.phrase()} {_relation(b, a)} {a.phrase()}"]
    phrases = [o.phrase() for o in objects]
    first = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    return [first, f"three shapes: {first}"]


@dataclass(frozen=True)
class Question:
    kind: str  # colour | shape | size | count | exists | left
    question: str
    answer: str


def questions(scene: Scene, rng: random.Random) -> list[Question]:
    """Every question the scene answers unambiguously (objects are named by a property only they have)."""
    out: list[Question] = []
    by_shape = {s.shape: [o for o in scene.shapes if o.shape == s.shape] for s in scene.shapes}
    by_colour = {s.colour: [o for o in scene.shapes if o.colour == s.colour] for s in scene.shapes}
    for obj in scene.shapes:
        if len(by_shape[obj.shape]) == 1:
            out.append(Question("colour", f"what colour is the {obj.shape}?", obj.colour))
            out.append(Question("size", f"what size is the {obj.shape}?", obj.size))
        if len(by_colour[obj.colour]) == 1:
            out.append(Question("shape", f"what shape is the {obj.colour} object?", obj.shape))
    out.append(Question("count", "how many shapes are there?", COUNT_WORDS[len(scene.shapes)]))
    present = rng.choice(scene.shapes)
    colour = rng.choice(tuple(COLOURS))
    shape = rng.choice(SHAPES)
    exists = any(o.colour == colour and o.shape == shape for o in scene.shapes)
    out.append(Question("exists", f"is there a {present.colour} {present.shape}?", "yes"))
    out.append(Question("exists", f"is there a {colour} {shape}?", "yes" if exists else "no"))
    unique = [o for o in scene.shapes if len(by_shape[o.shape]) == 1]
    if len(unique) >= 2:
        a, b = rng.sample(unique, 2)
        if abs(a.x - b.x) > 6:
            answer = "yes" if a.x < b.x else "no"
            out.append(Question("left", f"is the {a.shape} to the left of the {b.shape}?", answer))
    return out


# How often each kind is asked, so that the most common answer of every kind together stays far below 50%.
QUESTION_WEIGHTS = {"colour": 0.3, "shape": 0.25, "count": 0.15, "size": 0.1, "exists": 0.1, "left": 0.1}


def pick_question(scene: Scene, rng: random.Random) -> Question:
    """One question about the scene, its kind drawn by ``QUESTION_WEIGHTS`` among those the scene can answer."""
    candidates = questions(scene, rng)
    kinds = sorted({q.kind for q in candidates})
    kind = rng.choices(kinds, weights=[QUESTION_WEIGHTS[k] for k in kinds])[0]
    return rng.choice([q for q in candidates if q.kind == kind])


@dataclass(frozen=True)
class Episode:
    """A 2-way binding episode: ``demos`` are (scene, word) pairs of two object kinds; the query is a new scene of one
    of them, and ``answer`` is that kind's word. ``words`` are the two candidates."""

    demos: tuple[tuple[Scene, str], ...]
    query: Scene
    answer: str
    words: tuple[str, str]


def binding_episode(split: str, index: int, *, shots: int = 4) -> Episode:
    """Episode ``index`` of ``split``: ``shots`` (even) demos, half per kind, one-object scenes of random size and
    position, words from the split's pool (``TRAIN_WORDS`` or ``TEST_WORDS``).

    The two kinds are any two of ``KINDS``: most differ in shape and colour, some only in one of them. (Kinds rather
    than shapes alone: the tiny CLIP's features vary more with colour than with shape, and binding by shape across
    colours was learnt by only some seeds; see docs/micro.md.)
    """
    if shots < 2 or shots % 2:
        raise ValueError(f"A 2-way binding episode needs an even number of demos >= 2; got shots={shots}.")
    rng = rng_for(split, "episode", index)
    kinds = rng.sample(KINDS, 2)
    pool = TRAIN_WORDS if split == "train" else TEST_WORDS
    pair = tuple(rng.sample(pool, 2))
    while _first_syllable(pair[0]) == _first_syllable(pair[1]):  # the first token already tells them apart
        pair = tuple(rng.sample(pool, 2))
    # Each successive pair of demos shows both shapes, in random order: every even-length prefix is balanced, so the
    # first k demos of an episode are a fair k-shot prompt.
    order = [i for _ in range(shots // 2) for i in rng.sample((0, 1), 2)]
    def scene(which: int) -> Scene:
        colour, shape = kinds[which]
        return make_scene(rng, num_shapes=1, shape=shape, colour=colour)

    demos = tuple((scene(which), pair[which]) for which in order)
    target = rng.randrange(2)
    query = scene(target)
    return Episode(demos, query, pair[target], pair)
