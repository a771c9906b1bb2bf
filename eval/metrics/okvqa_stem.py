"""OK-VQA answer stemming, as OpenFlamingo applies it to predictions (open_flamingo/eval/ok_vqa_utils.py).

OK-VQA v1.1's annotation answers are stemmed; a prediction is stemmed the same way before the VQA evaluator sees it.
The rule, per word of the nltk-tokenised prediction:

1. a manual table (below; found by the OK-VQA/Flamingo authors by comparing raw and stemmed annotation answers);
2. else, words ending in "ing" -> their WordNet verb lemma ("skiing" -> "ski");
3. else, plural nouns (POS tag NNS/NNPS) -> ``inflection.singularize`` ("dogs" -> "dog").

Backends. The exact rule needs nltk's tagger and WordNet data, which are downloaded, not installed from PyPI. When
they are present (``nltk.download(["averaged_perceptron_tagger_eng", "wordnet"])``) we use them and match OpenFlamingo
exactly. Otherwise (an offline machine) we use ``lemminflect``'s bundled lexicon for both decisions: a word ending in
"ing" takes lemminflect's dictionary verb lemma (unknown words stay unchanged, as WordNet leaves them), and a word is
a plural noun if lemminflect's dictionary gives it a different noun lemma or ``inflection`` knows it as an irregular
plural ("people"). Known differences from WordNet: where two verb lemmas exist WordNet picks the shorter ("hoping" ->
"hop", lemminflect "hope"), and a few nouns in "ing" ("ceiling") have a WordNet verb reading. Tokenisation is nltk's
Treebank word tokenizer in both backends (it needs no data). Install with ``pip install nltk inflection lemminflect``.
"""

from __future__ import annotations

from functools import lru_cache

# (word -> stem), verbatim from OpenFlamingo's ok_vqa_utils._MANUAL_MATCHES (data, kept identical for comparability).
MANUAL_MATCHES = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride", "leaves": "leaf",
    "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite", "firefighters": "firefight",
    "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove", "tennis": "tennis",
    "dining": "dine", "directions": "direct", "waves": "wave", "christmas": "christmas", "drives": "drive",
    "pudding": "pud", "coding": "code", "plating": "plate", "quantas": "quanta", "hornes": "horn", "graves": "grave",
    "mating": "mate", "paned": "pane", "alertness": "alert", "sunbathing": "sunbath", "tenning": "ten",
    "wetness": "wet", "urinating": "urine", "sickness": "sick", "braves": "brave", "firefighting": "firefight",
    "lenses": "lens", "reflections": "reflect", "backpackers": "backpack", "eatting": "eat", "designers": "design",
    "curiousity": "curious", "playfulness": "play", "blindness": "blind", "hawke": "hawk", "tomatoe": "tomato",
    "rodeoing": "rodeo", "brightness": "bright", "circuses": "circus", "skateboarders": "skateboard",
    "staring": "stare", "electronics": "electron", "electicity": "elect", "mountainous": "mountain",
    "socializing": "social", "hamburgers": "hamburg", "caves": "cave", "transitions": "transit", "wading": "wade",
    "creame": "cream", "toileting": "toilet", "sautee": "saute", "buildings": "build", "belongings": "belong",
    "stockings": "stock", "walle": "wall", "cumulis": "cumuli", "travelers": "travel", "conducter": "conduct",
    "browsing": "brows", "pooping": "poop", "haircutting": "haircut", "toppings": "top", "hearding": "heard",
    "sunblocker": "sunblock", "bases": "base", "markings": "mark", "mopeds": "mope",
    "kindergartener": "kindergarten", "pies": "pie", "scrapbooking": "scrapbook", "couponing": "coupon",
    "meetings": "meet", "elevators": "elev", "lowes": "low", "men's": "men", "childrens": "children",
    "shelves": "shelve", "paintings": "paint", "raines": "rain", "paring": "pare", "expressions": "express",
    "routes": "rout", "pease": "peas", "vastness": "vast", "awning": "awn", "boy's": "boy", "drunkenness": "drunken",
    "teasing": "teas", "conferences": "confer", "ripeness": "ripe", "suspenders": "suspend", "earnings": "earn",
    "reporters": "report", "kid's": "kid", "containers": "contain", "corgie": "corgi", "porche": "porch",
    "microwaves": "microwave", "batter's": "batter", "sadness": "sad", "apartments": "apart", "oxygenize": "oxygen",
    "striping": "stripe", "purring": "pure", "professionals": "profession", "piping": "pipe", "farmer's": "farmer",
    "potatoe": "potato", "emirates": "emir", "womens": "women", "veteran's": "veteran", "wilderness": "wilder",
    "propellers": "propel", "alpes": "alp", "charioteering": "chariot", "swining": "swine", "illness": "ill",
    "crepte": "crept", "adhesives": "adhesive", "regent's": "regent", "decorations": "decor", "rabbies": "rabbi",
    "overseas": "oversea", "travellers": "travel", "casings": "case", "smugness": "smug", "doves": "dove",
    "nationals": "nation", "mustange": "mustang", "ringe": "ring", "gondoliere": "gondolier",
    "vacationing": "vacate", "reminders": "remind", "baldness": "bald", "settings": "set", "glaced": "glace",
    "coniferous": "conifer", "revelations": "revel", "personals": "person", "daughter's": "daughter",
    "badness": "bad", "projections": "project", "polarizing": "polar", "vandalizers": "vandal", "minerals": "miner",
    "protesters": "protest", "controllers": "control", "weddings": "wed", "sometimes": "sometime", "earing": "ear",}


@lru_cache(maxsize=1)
def _backend():
    try:
        import inflection
        import nltk
    except ImportError as error:
        raise ImportError(
            "OK-VQA stemming needs nltk and inflection (and lemminflect offline): pip install nltk inflection lemminflect"
        ) from error
    tokenizer = nltk.tokenize.NLTKWordTokenizer()
    try:
        from nltk.corpus.reader import VERB

        lemmatizer = nltk.stem.WordNetLemmatizer()
        lemmatizer.lemmatize("testing", VERB)  # raises LookupError without the WordNet data
        nltk.pos_tag(["test"])  # raises LookupError without the tagger data

        def lemma_ing(word: str) -> str:
            return lemmatizer.lemmatize(word, VERB)

        def plural_flags(words: list[str]) -> list[bool]:
            return [tag.startswith("NNS") or tag.startswith("NNPS") for _, tag in nltk.pos_tag(words)]

        name = "nltk"
    except LookupError:
        try:
            import lemminflect
        except ImportError as error:
            raise ImportError(
                "OK-VQA stemming without nltk's downloaded data needs lemminflect: pip install lemminflect"
            ) from error
        # Plurals that lemminflect lists as their own noun lemma but a tagger calls NNS (inflection's irregulars).
        irregular = {"people", "men", "women", "children", "feet", "teeth", "geese", "mice"}

        def lemma_ing(word: str) -> str:
            lemmas = lemminflect.getAllLemmas(word).get("VERB")  # dictionary only: no guessing for unknown words
            return lemmas[0] if lemmas else word

        def plural_flags(words: list[str]) -> list[bool]:
            flags = []
            for word in words:
                nouns = lemminflect.getAllLemmas(word).get("NOUN")
                flags.append(bool(nouns) and (nouns[0] != word or word.lower() in irregular))
            return flags

        name = "lemminflect"
    return name, tokenizer, inflection, lemma_ing, plural_flags


def stem_backend() -> str:
    """"nltk" (exact, with nltk's downloaded data) or "lemminflect" (offline approximation)."""
    return _backend()[0]


def require_stem_backend() -> str:
    """:func:`stem_backend`, with a missing package reported as a ValueError (a setup error: one line, no traceback)."""
    try:
        return stem_backend()
    except ImportError as error:
        raise ValueError(f"okvqa: {error} (or: pip install 'flamingo[eval]').") from error


def okvqa_stem(text: str) -> str:
    """Stem an OK-VQA prediction word by word (see the module docstring); words are re-joined with single spaces."""
    _, tokenizer, inflection, lemma_ing, plural_flags = _backend()
    words = tokenizer.tokenize(text)
    stemmed = []
    for word, plural in zip(words, plural_flags(words)):
        if word in MANUAL_MATCHES:
            word = MANUAL_MATCHES[word]
        elif word.endswith("ing"):
            word = lemma_ing(word)
        elif plural:
            word = inflection.singularize(word)
        stemmed.append(word)
    return " ".join(stemmed)
