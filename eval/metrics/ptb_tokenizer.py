"""PTB tokenisation of captions as pycocoevalcap does it, in pure Python (no Java needed).

pycocoevalcap runs Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` on each caption and then drops
the tokens in ``PUNCTUATION`` below. This module reproduces the result on caption text: the same splits (clitics
"dog 's", negations "is n't", "ca n't", "can not", "gon na"; "$ 5", "20 %", "3.5 mm"), the same words kept whole
(hyphenated words, numbers like "1,000.50", "10:30", "1/2", acronyms "u.s.", abbreviations "mr." "st." "etc.",
"o'clock"), brackets rewritten as "-lrb-" "-rrb-" ... (which pycocoevalcap then keeps, because its punctuation list
is upper case and the tokens were lowercased), and quotes, dashes, periods and ellipses removed.

Tested against the jar (tests/test_eval_metrics.py): identical output on 150 hand-picked tricky captions and 1,500
random caption-like lines; on an adversarial set that glues tokens together without spaces ("Mt.-green",
"'90s'10:30") about 2% of lines still differ. Known limits: CoreNLP's URL, e-mail, emoticon and sign-before-number
rules are approximated. ``ptb_tokenize_batch(..., backend="java")`` runs the real tokenizer through pycocoevalcap
(``pip install pycocoevalcap``, Java on PATH) for an exact check.

pycocoevalcap tokenises a whole batch of captions as one text, and two CoreNLP rules look past a line end, so a
caption's tokens can depend on the next caption; ``ptb_tokenize_batch`` reproduces that for captions given in the
same order (``cider`` uses COCOEvalCap's order).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# pycocoevalcap's list (tokenizer/ptbtokenizer.py). Tokens are compared after lowercasing, so "-LRB-" etc. never match.
PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_NORMALIZE = [
    (re.compile("[\u2018\u2019\u201b\u0092\u0091]"), "'"),  # curly single quotes and apostrophes
    (re.compile("[\u201c\u201d\u201e\u201f]"), '"'),
    (re.compile("[\u2013\u2014\u2012\u2015]"), " -- "),  # en/em dashes become "--"
    (re.compile("\u2026"), " ... "),
    # CoreNLP 3.4.1 reads UTF-16 code units and deletes what it cannot tokenize: characters outside the BMP (emoji).
    (re.compile("[\U00010000-\U0010ffff]"), ""),
    (re.compile("&amp;", re.I), "&"),
    (re.compile("&lt;", re.I), "<"),
    (re.compile("&gt;", re.I), ">"),
    (re.compile("&quot;", re.I), '"'),
]

# Words that keep their period, exactly as written (CoreNLP 3.4.1 is case-sensitive here: "Pa." keeps it, "pa."
# does not). Derived by running the jar on "see W. x" and "see W. 5" for CoreNLP's abbreviation lists in lower,
# Capitalised and UPPER case. The second set keeps its period only before a number ("no. 5" but "no . x").
_ABBREVIATIONS = frozenset(
    """
    adj Adj ADJ adm Adm ADM adv Adv ADV al Al AL ala Ala ALA apr Apr APR ariz Ariz ARIZ Ark ARK assn Assn ASSN
    assoc Assoc ASSOC asst Asst ASST atty Atty ATTY attys Attys ATTYS aug Aug AUG ave Ave AVE Az AZ bancorp
    Bancorp BANCORP bhd Bhd BHD bldg Bldg BLDG blvd Blvd BLVD brig Brig BRIG bros Bros BROS calif Calif CALIF
    capt Capt CAPT cf Cf CF cie Cie CIE cmdr Cmdr CMDR co Co CO col Col COL colo Colo COLO comdr Comdr COMDR
    conn Conn CONN corp Corp CORP cos Cos COS cpl Cpl CPL ct Ct CT dak Dak DAK dec Dec DEC Del DEL dept Dept
    DEPT det Det DET dr Dr DR drs Drs DRS elec Elec ELEC ens Ens ENS esq Esq ESQ est Est EST etc Etc ETC ext Ext
    EXT feb Feb FEB fla Fla FLA fri Fri FRI ft Ft FT ga Ga GA gen Gen GEN gov Gov GOV govs Govs GOVS hon Hon HON
    Ill ILL inc Inc INC ind Ind IND insp Insp INSP intl Intl INTL invt Invt INVT jan Jan JAN jos Jos JOS jr Jr
    JR jul Jul JUL jun Jun JUN kan Kan KAN kans Kans KANS ky Ky KY La LA lieut Lieut LIEUT lt Lt LT ltd Ltd LTD
    maj Maj MAJ mar Mar MAR Mass MASS md Md MD messrs Messrs MESSRS mfg Mfg mich Mich MICH minn Minn MINN Miss
    MISS mlle Mlle MLLE mme Mme MME mo Mo MO mon Mon MON mont Mont MONT mr Mr MR mrs Mrs MRS ms Ms MS msgr Msgr
    MSGR mt Mt MT mtg Mtg natl Natl NATL neb Neb NEB nev Nev NEV nov Nov NOV oct Oct OCT okla Okla OKLA Ore ORE
    Pa PA penn Penn PENN pfc Pfc PFC ph Ph PH plc Plc PLC pres Pres PRES prof Prof PROF profs Profs PROFS pte
    Pte ptes Ptes pty Pty ptys Ptys pvt Pvt PVT rd Rd RD rep Rep REP reps Reps REPS rev Rev REV rt Rt RT sen Sen
    SEN sens Sens SENS sep Sep SEP sept Sept SEPT seq Seq SEQ sfc Sfc SFC sgt Sgt SGT spc Spc SPC sq Sq SQ sr Sr
    SR st St ST ste Ste STE supt Supt SUPT supts Supts SUPTS sys Sys SYS tel Tel TEL tenn Tenn TENN Tex TEX thu
    Thu THU thurs Thurs THURS treas Treas TREAS tue Tue TUE tues Tues TUES univ Univ UNIV va Va VA vs Vs VS vt
    Vt VT Wash WASH wed Wed WED wis Wis WIS wisc Wisc WISC wm Wm WM wyo Wyo WYO
    """.split()
)
_ABBREV_BEFORE_NUMBER = frozenset(
    """
    art Art ART ca Ca CA fig Fig FIG figs Figs FIGS no No NO nos Nos NOS op Op OP pp Pp PP prop Prop PROP
    """.split()
)

_L = r"[^\W\d_]"  # a letter (any script)
_A = r"[^\W_]"  # a letter or digit
_NUM = r"(?:\d+(?:[.:,]\d+)*|\d*(?:[.,]\d+)+)"
_CANDIDATES = [
    # (name, pattern); the longest match wins and ties go to the earlier entry, as in a JFlex lexer.
    ("url", re.compile(r"(?:https?|ftp)://[^\s<>\"'()\[\]{}]*[^\s<>\"'()\[\]{}.,;:!?]")),
    ("email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9][A-Za-z0-9.-]*[A-Za-z0-9]")),
    ("handle", re.compile(r"[@#][A-Za-z_]\w*")),
    ("smiley", re.compile(r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]](?!\w)")),
    ("prog", re.compile(r"(?i:c\+\+|[cf]#)")),
    ("date", re.compile(r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}")),
    ("fraction", re.compile(r"(?:\d{1,4}[- ])?\d{1,4}\\?/\d{1,4}")),
    ("number", re.compile(rf"[-+]?{_NUM}")),
    ("thinga", re.compile(r"[A-Z]+(?:&[A-Z]+)+")),
    # Hyphenated words; the first part may hold periods and commas ("Ave.-10", "1.5-liter"), later parts are
    # alphanumeric (with decimals) or an acronym with its period ("in-a.m.").
    ("hyphenated", re.compile(rf"[-+]?{_A}[\w.,]*?(?:[-_\u2010\u2011](?:[A-Za-z](?:\.[A-Za-z])+\.|{_A}+(?:\.\d+)?))+")),
    # CoreNLP 3.4.1 joins "and/or" but splits "zoë / toy": its slash rule is ASCII-only.
    ("slashed", re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}")),
    ("apoword", re.compile(rf"[A-HJ-XZa-hj-xz]'{_L}{{2,}}{_L}*")),
    ("apoword2", re.compile(r"(?i:th|y)'(?=[^\W\d_])")),
    ("acronym", re.compile(rf"{_L}(?:\.{_L})+\.?")),
    ("word", re.compile(rf"{_A}+(?:[.!?]{_L}{_A}*)*")),
    ("apostrophe_token", re.compile(r"'(?:n'|em\b|\d\ds?\b)|'n'|(?i:'t)(?=(?:is|was)\b)", re.I)),
    ("ellipsis", re.compile(r"\.\.\.+")),
    ("dashes", re.compile(r"--+")),
    ("hyphen", re.compile("[\u2010\u2011]")),  # a lone Unicode hyphen is a "-" token
    ("marks", re.compile(r"[?!]+")),
    ("quotes", re.compile(r"``|''|\"|'|`")),
    ("other", re.compile(r".", re.S)),
]
# CoreNLP takes an acronym's period as a sentence end when one of these words (case-sensitive) follows and is itself
# followed by whitespace -- even on the next line of the batch. For a one-letter acronym that takes the period off
# the token ("vitamin C. The" -> "c"). The list is CoreNLP 3.4.1's, found by running the jar on each candidate.
_SENTENCE_START = re.compile(
    r"\s+(?:A|About|According|Additionally|After|An|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|More|"
    r"Mr\.|Ms\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There|These|They|This|We|When|"
    r"While|What|Yet|You)\s"
)
_CLITIC = re.compile(r"'(?:s|m|d|re|ve|ll)(?![^\W\d_])", re.I)
_NOT = re.compile(r"n['`]t(?![^\W\d_])", re.I)  # "don`t" -> "do n`t" (kept as typed)
_SPECIAL_SPLITS = {"cannot": 3, "gonna": 2, "gotta": 2, "wanna": 2, "gimme": 2, "lemme": 2}


def _next_token(text: str, pos: int) -> tuple[str, str]:
    best_name, best = "other", ""
    for name, pattern in _CANDIDATES:
        match = pattern.match(text, pos)
        if match and len(match.group()) > len(best):
            best_name, best = name, match.group()
    return best_name, best


def _tokenize_line(line: str, following: str = "") -> list[str]:
    """Tokens of one line, before lowercasing. ``following``: the next lines of the batch, which CoreNLP's
    look-ahead rules can see ("no." before a number, "a." before "The")."""
    tokens: list[str] = []
    pos = 0
    while pos < len(line):
        if line[pos].isspace():
            pos += 1
            continue
        clitic = _CLITIC.match(line, pos)
        if clitic:  # a second clitic ("I'd've"), or one after a space or a bracket
            tokens.append(clitic.group())
            pos = clitic.end()
            continue
        name, token = _next_token(line, pos)
        end = pos + len(token)
        if name in ("word", "hyphenated", "number", "acronym"):
            # A word ends before a clitic ('s, 'd, 're, ...) or before n't ("is|n't", "ca|n't").
            clitic = _CLITIC.match(line, end)
            if name == "word" and token[-1:] in "nN" and len(token) > 1 and line[end : end + 1] in ("'", "`") \
                    and _NOT.match(line, end - 1):
                tokens += [token[:-1], line[end - 1 : end + 2]]
                pos = end + 2
                continue
            if name == "word" and token.lower() in _SPECIAL_SPLITS and not re.match(r"[^\W\d_]", line[end:end + 1]):
                cut = len(token) - _SPECIAL_SPLITS[token.lower()]
                tokens += [token[:cut], token[cut:]]
                pos = end
                continue
            if name == "acronym" or (name in ("word", "hyphenated") and line.startswith(".", end)):
                token, end = _trailing_period(line, pos, token, following)
            tokens.append(token)
            pos = end
            if clitic and clitic.start() == end:
                tokens.append(clitic.group())
                pos = clitic.end()
            continue
        if name == "fraction":
            token = token.replace(" ", "\u00a0")  # "2 1/2" is one token; CoreNLP joins it with a no-break space
        elif name == "ellipsis":
            token = "..."
        elif name == "dashes":
            token = "--"
        elif name == "hyphen":
            token = "-"
        elif name == "smiley":
            token = "".join(_BRACKETS.get(c, c) for c in token)
        elif name == "quotes":
            token = "''" if token == '"' else token  # CoreNLP picks `` or '' by position; both are dropped later
        elif token in _BRACKETS:
            token = _BRACKETS[token]
        tokens.append(token)
        pos = end
    return tokens


def _trailing_period(line: str, pos: int, token: str, following: str) -> tuple[str, int]:
    """Decide whether the period after a word belongs to it (acronyms, abbreviations) or is punctuation."""
    end = pos + len(token)
    stem = token[:-1] if token.endswith(".") else token
    has_period = token.endswith(".") or line.startswith(".", end)
    if not has_period:
        return token, end
    after = end + (0 if token.endswith(".") else 1)
    context = line[after:] + ("\n" + following if following else "")  # the batch's last line ends at EOF
    if re.fullmatch(rf"{_L}(?:\.{_L})*", stem):  # acronyms and single letters: "u.s.", "a."
        if len(stem) == 1 and _SENTENCE_START.match(context):
            return stem, pos + 1  # "... vitamin C. The ..." : a sentence end after a one-letter acronym
        return stem + ".", after
    if re.match(r"[,;:]", line[after:]):  # CoreNLP keeps the period of any word before , ; : ("etc.,")
        return stem + ".", after
    if stem in _ABBREVIATIONS or (stem in _ABBREV_BEFORE_NUMBER and re.match(r"\s?\d", context)):
        return stem + ".", after  # an abbreviation keeps its period even before more dots ("mrs. . .")
    return stem, pos + len(stem)


def _normalize(text: str) -> str:
    for pattern, replacement in _NORMALIZE:
        text = pattern.sub(replacement, text)
    return text


def ptb_tokens(text: str, following: str = "") -> list[str]:
    """The PTB tokens of one line, lowercased, punctuation tokens included (like the Java tool's output, except that
    every double quote comes out as '' -- CoreNLP's `` vs '' choice is not reproduced, as both are dropped anyway)."""
    return [t.lower() for t in _tokenize_line(_normalize(text), _normalize(following))]


def ptb_tokenize(text: str, following: str = "") -> str:
    """What pycocoevalcap's PTBTokenizer makes of one caption: lowercased tokens without punctuation, space-joined.

    ``following``: the captions after this one in the same tokenizer call (pycocoevalcap tokenises a whole batch as
    one text, and two CoreNLP rules look across line ends); only matters for one-letter acronyms and "no."-type
    abbreviations at the very end of a caption.
    """
    return " ".join(t for t in ptb_tokens(text.replace("\n", " "), following) if t not in PUNCTUATION)


def ptb_tokenize_batch(texts: Sequence[str], *, backend: str = "python") -> list[str]:
    """``ptb_tokenize`` over many captions. ``backend="java"`` runs pycocoevalcap's Java tokenizer instead (needs
    ``pip install pycocoevalcap`` and a ``java`` on PATH); both give the same strings on caption text."""
    if backend == "python":
        lines = [t.replace("\n", " ") for t in texts]
        return [ptb_tokenize(line, "\n".join(lines[i + 1 : i + 4])) for i, line in enumerate(lines)]
    if backend != "java":
        raise ValueError(f"ptb_tokenize_batch: backend must be 'python' or 'java', got {backend!r}")
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as error:
        raise ValueError("backend='java' needs pycocoevalcap: pip install pycocoevalcap") from error
    result = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [result[i][0] for i in range(len(texts))]
