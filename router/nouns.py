"""Counting the nouns of a prompt offline, with the lexicon that ships inside the ``lemminflect`` package.

No part-of-speech tagger model can be downloaded on the machines this project runs on, so nouns are found
with a lexicon and a few context rules instead of a trained tagger:

1. Closed-class words (determiners, pronouns, prepositions, conjunctions, auxiliaries, numerals) are never
   nouns.
2. A word the lexicon knows only as a noun is a noun. A word it does not know at all is taken as a noun
   (names, brands and rare objects are the usual out-of-lexicon words in image prompts) unless it ends like
   an adjective or adverb (-ly, -ous, -ful, ...). A hyphenated word is judged by its last part
   ("smoke-*wreathed*").
3. A word that can be a noun or an adjective is an adjective when a noun-capable word follows it
   ("*red* car"), else a noun ("a shade of *red*").
4. A word that can be a noun or a verb is a verb when it is a participle that modifies a following noun or
   is not preceded by a determiner ("a *running* horse", "*tending* flowers", but "a *painting* of"), when it
   follows a pronoun or a modal ("they *dance*"), when it is a verb's base form after "to" ("to *dance*", but
   "to *flowers*"), or when a noun precedes it and a determiner or possessive follows ("a man *walks* his
   dog"); otherwise a noun.

Limits: without a statistical tagger, noun-verb ambiguity is resolved by these rules only ("a cat *sleeps*
on a sofa" counts *sleeps* as a noun), and noun-noun compounds count each part ("fire truck" is two nouns),
except that an adjective-capable first part counts as an adjective ("light bulb" is one noun). The router that uses
it is a baseline that follows the observation that prompts with more objects favour the large model; it does
not claim tagger accuracy.
"""

from __future__ import annotations

import re
from functools import lru_cache

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")

DETERMINERS = frozenset(
    [
        "a",
        "an",
        "the",
        "this",
        "that",
        "these",
        "those",
        "each",
        "every",
        "some",
        "any",
        "no",
        "another",
        "either",
        "neither",
        "much",
        "many",
        "few",
        "several",
        "all",
        "both",
        "such",
        "what",
        "which",
        "whose",
    ]
)
POSSESSIVES = frozenset(["my", "your", "his", "her", "its", "our", "their"])
PRONOUNS = frozenset(
    [
        "i",
        "you",
        "he",
        "she",
        "it",
        "we",
        "they",
        "me",
        "him",
        "us",
        "them",
        "who",
        "whom",
        "one",
        "someone",
        "something",
        "everyone",
    ]
)
MODALS = frozenset(["can", "could", "will", "would", "shall", "should", "may", "might", "must"])
ADJECTIVE_ENDINGS = ("ly", "ous", "ful", "ive", "less", "ish", "ic", "al", "able", "ible", "esque")
"""Endings that mark an out-of-lexicon word as an adjective or adverb rather than a noun."""
CLOSED_CLASS = (
    DETERMINERS
    | POSSESSIVES
    | PRONOUNS
    | MODALS
    | frozenset(["to"])
    | frozenset(
        [
            "of",
            "in",
            "on",
            "at",
            "by",
            "for",
            "with",
            "without",
            "from",
            "into",
            "onto",
            "upon",
            "over",
            "under",
            "above",
            "below",
            "between",
            "among",
            "through",
            "during",
            "before",
            "after",
            "behind",
            "beside",
            "besides",
            "near",
            "off",
            "out",
            "up",
            "down",
            "about",
            "against",
            "along",
            "around",
            "across",
            "toward",
            "towards",
            "within",
            "inside",
            "outside",
            "beneath",
            "underneath",
            "atop",
            "amid",
            "amidst",
            "via",
            "per",
            "like",
            "unlike",
            "than",
            "as",
            "and",
            "or",
            "but",
            "nor",
            "so",
            "yet",
            "if",
            "while",
            "when",
            "where",
            "whereas",
            "because",
            "though",
            "although",
            "is",
            "are",
            "was",
            "were",
            "be",
            "been",
            "being",
            "am",
            "do",
            "does",
            "did",
            "has",
            "have",
            "had",
            "having",
            "not",
            "very",
            "too",
            "also",
            "just",
            "only",
            "even",
            "then",
            "there",
            "here",
            "how",
            "why",
            "zero",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "twenty",
            "thirty",
            "hundred",
            "thousand",
            "first",
            "second",
            "third",
            "fourth",
            "fifth",
            "myself",
            "yourself",
            "himself",
            "herself",
            "itself",
            "ourselves",
            "themselves",
            "yours",
            "mine",
            "hers",
            "ours",
            "theirs",
        ]
    )
)
"""Words that are never counted as nouns."""


@lru_cache(maxsize=65_536)
def _lexicon(word: str) -> frozenset[str]:
    """Universal POS tags the lexicon allows for ``word`` (empty when the word is not in it)."""
    import lemminflect

    return frozenset(lemminflect.getAllLemmas(word))


@lru_cache(maxsize=65_536)
def _verb_lemma(word: str) -> str | None:
    import lemminflect

    lemmas = lemminflect.getAllLemmas(word).get("VERB")
    return lemmas[0] if lemmas else None


def _words(prompt: str) -> list[str]:
    words = []
    for token in _WORD.findall(prompt):
        word = token.lower().removesuffix("'s").removesuffix("'").strip("-'")
        # A hyphenated compound takes the part of speech of its head, the last part.
        word = word.rsplit("-", 1)[-1]
        if word:
            words.append(word)
    return words


def _noun_capable(word: str | None) -> bool:
    if word is None or word in CLOSED_CLASS:
        return False
    tags = _lexicon(word)
    if not tags:
        return not word.endswith(ADJECTIVE_ENDINGS)
    return "NOUN" in tags or "PROPN" in tags


def nouns(prompt: str) -> list[str]:
    """The words of ``prompt`` taken as nouns, in order (see the module docstring for the rules)."""
    words = _words(prompt)
    found: list[str] = []
    counted = [False] * len(words)
    for i, word in enumerate(words):
        if not _noun_capable(word):
            continue
        tags = _lexicon(word)
        prev = words[i - 1] if i > 0 else None
        nxt = words[i + 1] if i + 1 < len(words) else None
        noun = True
        if "ADJ" in tags and _noun_capable(nxt):
            noun = False
        elif "VERB" in tags:
            lemma = _verb_lemma(word)
            participle = word.endswith(("ing", "ed")) and lemma is not None and lemma != word
            if (
                (participle and (prev not in DETERMINERS | POSSESSIVES or _noun_capable(nxt)))
                or prev in PRONOUNS
                or prev in MODALS
                or (prev == "to" and lemma == word)
                or (i > 0 and counted[i - 1] and nxt in DETERMINERS | POSSESSIVES)
            ):
                noun = False
        if noun:
            counted[i] = True
            found.append(word)
    return found


def count_nouns(prompt: str) -> int:
    return len(nouns(prompt))
