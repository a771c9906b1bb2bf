"""Shared pieces of the evaluation tests (helper EA): caption corpora and the reference implementations we compare with.

The references are the tools the papers used: pycocoevalcap (Java PTB tokenizer + CIDEr scorer) for captions and a
plain pairwise count for ROC-AUC.
"""

from __future__ import annotations

import random

# Captions that exercise the PTB tokenizer's rules: clitics, negations, abbreviations, acronyms, numbers, quotes,
# brackets, dashes, ellipses, unicode, odd spacing.
TRICKY_CAPTIONS = [
    "A man's dog isn't running.",
    "They don't, can't, won't stop",
    'The colour of the grey theatre centre',
    'A dog (brown) is "happy" and \'sad\'',
    'Price is $1,000.50 or 3.5 or 1/2 and 10:30',
    "Mr. Smith and Dr. Jones met at St. Paul's in the U.S.",
    'a well-known self-driving car -- really...',
    'multiple    spaces   here',
    'café naïve résumé – — “quoted” ‘single’ …',
    'A dog.',
    '& and &amp; < > @ # % * ^ ~ + = | \\ /',
    'gonna wanna gotta cannot',
    "I'm you're we've he'd she'll it's o'clock rock'n'roll",
    'e-mail U.K. etc. vs. a.m. p.m. 5pm 3rd',
    'http://example.com foo@bar.com',
    '[bracket] {brace}',
    "A dog's toy and the dogs' toys.",
    "the boys' bikes are parked",
    "it's 5 o'clock, isn't it?",
    "I'd've gone",
    "'tis the season 'twas",
    "Rock 'n' roll and 'em",
    "the '90s music in '95",
    'A sign that says "STOP".',
    "He said 'hello' to me",
    'A man riding a horse.. Two dogs...',
    'A cat on a mat.It is',
    'The U.S.A. flag and the U.K.',
    'A picture of St. Louis. A picture of Mt. Everest.',
    'Mr. and Mrs. Smith, Jr. and Sr. Co. Inc. Ltd. Corp.',
    'no. 5 and No. 7 vs. approx. 3 ft. tall etc. e.g. i.e.',
    'Jan. Feb. Aug. Sept. Mon. Tues.',
    'a.m. p.m. A.M. 5 a.m.',
    'Ave. Blvd. Rd. St. Dept.',
    'The dog is brown.   ',
    'A Dog IS Brown!',
    'Wait... what?!',
    'What?? No!!',
    'A 3-year-old boy with a 12-inch pizza',
    'The man (left) and woman (right).',
    'A man wearing a t-shirt & jeans',
    '20% off $5.99 #1 @home',
    '5\'6" tall with a 2x4',
    '1980s 1st 2nd 3rd 4th',
    '3:00 pm 12:30PM 10-15 1-2',
    'A -- B - C --- D',
    'e.g., eg. ie.',
    'The sign reads: "Welcome!"',
    "Children's toys, people's choice, James' car",
    "Couldn't wouldn't shouldn't mustn't needn't ain't",
    "It'll they'll we're they're you've who's",
    'a b.c. a.b.c.d. x.y',
    'OK. ok. Ok.',
    'the No. 1 train',
    'a dog; a cat: a bird',
    '  leading and trailing spaces  ',
    'tab\tseparated\twords',
    'A  B',
    'one/two and/or either/or',
    '"quoted" and ``latex\'\' quotes',
    '“Smart quotes” and ‘single smart’ quotes',
    'A man’s hat and it’s fine and don’t',
    'em—dash and en–dash',
    'ellipsis… here',
    'café, naïve, Zoë, São Paulo',
    '100km 5kg 3.5mm 6ft',
    'A+ grade and C++ code',
    'x=5 y<3 z>2',
    'under_score and back\\slash',
    'A man w/ a hat',
    'The U.S. Army. The U.S. ',
    'A group of people at the beach .',
    'a woman is holding an umbrella ,',
    'Letter A. and B. and I. here',
    'He is at the U.S.',
    'the dog is at mile 5.',
    'approx. 5 fig. 3 Fig. 2 vol. 3 no. 3 sec. 2 ch. 4 pp. 4',
    'a man in the st. and mt. and the ave.',
    'a sign with the word EXIT.',
    '10.5. and 3.',
    'The cat sat on the mat.',
    'cat . dog , bird',
    "we're o'clock O'Neil d'Avignon l'amour I'm y'all",
    "don't DON'T Don't can't CAN'T won't Won't cannot Cannot",
    "dogs' dogs's boss's",
    "a dog'",
    "'quoted'",
    "'90s the 90's 1990's",
    "He's She's It's Let's",
    'the 1/2 and 3/4 and 10/12/2020',
    '-5 degrees +5 and 5-',
    'A man - who - is',
    '2x4 3x 4.5x',
    'www.google.com',
    'AT&T and Q&A and R&B',
    'pre- and post-war',
    'a 1.5-liter bottle',
    "12-year-old's",
    '#hashtag and @user',
    ':) ;) :-(',
    'a*b and ^ and ~ and |',
    "a woman holding a sign that says 'Free Hugs'.",
    'a STOP sign.',
    'Three men.Two women.',
    'Hello!Hi',
    'Mr.Smith',
    'word.',
    'word..',
    'word...',
    'word....',
    ',leading comma',
    '$20 1/2 off and 2 1/2 cups',
    'a man who don`t care and it`s fine',
    "there's what's that's where's",
    "a 'no parking' sign on the kids' playground",
    "McDonald's sign and O'Neill's pub",
    'A man is holding a sign that reads, "Free Hugs".',
    "No.5 and no.5 and #2 and 3D and 4x4 and TV's and DVD's and 1950's",
    'a smiley 😀 face and a ❤ heart',
    'a ‐ hyphen‐word and non‑breaking',
    'T.V. and tv and a.k.a. and vs and ca. 1900',
    'The bus #33 is going to Downtown/Airport.',
    'A plate with food on it(broccoli, carrots).',
    'two people at the table;one is eating',
    "a man with a ~ and `backtick' quoting",
    'A giraffe standing next to a tree.A zebra too',
    'A black and white photo of a man',
    'A cat laying on a bed next to a laptop computer',
    "a woman's hand holding a cell phone",
    'Red double-decker bus driving down the street',
    'A yellow fire hydrant sitting on the side of a road',
    'a plate of food with meat , potatoes and vegetables',
    'Two giraffes standing in a grassy field next to trees',
    'A pizza with pepperoni,cheese and olives',
    'A 747 jet airplane at the gate',
    'Skier at 10,000 ft.',
    'The clock reads 3:15 P.M.',
    'A train on tracks near a station in the U.S.A',
    'people riding horses on a beach at sunset...',
    'a bathroom with a toilet , sink , and mirror .',
    'A STOP sign at an intersection',
    'A man in a suit & tie',
    'An image of a boy w/ a kite',
    'A dog laying on a couch- relaxing',
    'An old-fashioned clock tower',
    'The Dr. Pepper can is on the table',
    "A sign for St. Patrick's Day parade",
    'A sign saying "don\'t walk"',
    'Cat (sleeping)',
    'A kitchen with stainless-steel appliances & granite counter-tops.',
]

_WORDS = """a an the man woman dog's dogs' cat cats people's children's isn't don't can't won't it's they're we've I'm
you'll he'd wasn't aren't couldn't cannot gonna wanna gotta o'clock rock'n'roll St. Mr. Mrs. Dr. U.S. U.K. D.C. etc.
no. No. vs. approx. e.g. i.e. a.m. p.m. 3 3.5 1,000 10:30 1/2 2x4 100km 3.5mm 1990s '90s 3rd 1st 5% $20 #1 @home
well-known t-shirt 3-year-old e-mail x-ray self-driving red-and-white T-shirt (left) (right) [sign] {x} "stop" 'hi'
\u201cquoted\u201d \u2019s \u2014 \u2013 \u2026 & &amp; + = / \\ * ^ ~ | < > _ one/two and/or w/ Ave. Rd. Blvd. Jan. Mt.
ft. Co. Inc. Jr. OK ok caf\u00e9 na\u00efve S\u00e3o Zo\u00eb STOP EXIT Hello!Hi mat.It www.site.com AT&T Q&A 12-inch
10-15 -5 +5 toy toys kitchen table sitting on under near red blue green large small with of and in at to by for from
""".split()
_SEPARATORS = [" ", " ", " ", " ", "  ", ", ", " - ", " -- ", "; ", ": ", ". "]
_ENDINGS = ["", ".", " .", "!", "?", "...", "..", " ", ",", ";", ":", "'", '"', ")"]


def random_captions(count: int, seed: int = 0) -> list[str]:
    """Caption-like lines mixing plain words with every kind of token above, separated the way people write."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        n = rng.randint(1, 12)
        parts = []
        for j in range(n):
            word = rng.choice(_WORDS)
            if rng.random() < 0.15:
                word = word.capitalize()
            if rng.random() < 0.05:
                word = word.upper()
            parts.append(word)
            if j < n - 1:
                parts.append(rng.choice(_SEPARATORS) if rng.random() < 0.25 else " ")
        lines.append("".join(parts) + rng.choice(_ENDINGS))
    return lines


def java_ptb_tokenize(texts: list[str]) -> list[str]:
    """pycocoevalcap's own tokenisation (Stanford PTBTokenizer in Java, then its punctuation filter); one Java call."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    result = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [result[i][0] for i in range(len(texts))]


def reference_cider(predictions: dict, references: dict) -> float:
    """What COCOEvalCap reports as CIDEr (x100): Java PTB tokenisation, then pycocoevalcap's Cider scorer."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in references})
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


def pairwise_auc(labels: list[int], scores: list[float]) -> float:
    """ROC-AUC x100 by its definition: over all (positive, negative) pairs, 1 if the positive scores higher, 1/2 if tied."""
    positives = [s for s, y in zip(scores, labels) if y == 1]
    negatives = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return 100.0 * wins / (len(positives) * len(negatives))
