"""The toy world's prompt grammar: user prompts, training captions, the prompt engineer, parse.

One regular grammar, comma-separated phrases after a noun phrase. Every attribute value has one
canonical phrase (``PHRASES``)::

    user prompt:     a[n] COLOUR SHAPE [on a BACKGROUND background]
    training caption a[n] [SIZE] [SATURATION] COLOUR SHAPE[, OUTLINE][, EDGES edges][, POSITION]
                     [, on a BACKGROUND background]
    engineered:      USER PROMPT, MODIFIER[, MODIFIER ...]   (2-4 modifiers, canonical order)

    OUTLINE  = outlined | no outline
    POSITION = centered | on the left | on the right | at the top | at the bottom
    MODIFIER = SIZE | SATURATION | OUTLINE | EDGES edges | POSITION | on a BACKGROUND background

``parse`` inverts all of these regardless of order: phrases are matched longest-first over the
words, so "a white circle on a white background" reads both whites right. Unknown words,
punctuation and the reward identifiers ``<reward k>`` are ignored, and the first phrase for an
attribute wins, so whatever a policy writes parses to something well defined.

Tokens are the words of ``vocabulary()`` plus ``","``; a word-level tokenizer should split the
comma off the preceding word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from parrot_jax.toyworld.world import ATTRIBUTES, Scenes, num_scenes, sample_scenes

POSITION_PHRASES = {"centre": "centered", "left": "on the left", "right": "on the right",
                    "top": "at the top", "bottom": "at the bottom"}
ARTICLES = ("a", "an")
OPTIONAL = ("size", "saturation", "outline", "edges", "position", "background")  # caption order

# The prompt engineer's prior: attribute -> (weight for being chosen, value probabilities).
# Plausible but not reward-optimal: it likes soft edges, pastel, large, centred, bright backdrops.
ENGINEER_PRIOR: dict[str, tuple[float, dict[str, float]]] = {
    "edges": (1.0, {"soft": 0.75, "sharp": 0.25}),
    "saturation": (1.0, {"pastel": 0.7, "vivid": 0.3}),
    "size": (0.7, {"large": 0.6, "medium": 0.2, "small": 0.2}),
    "position": (0.6, {"centre": 0.7, "left": 0.075, "right": 0.075, "top": 0.075,
                       "bottom": 0.075}),
    "background": (0.6, {"cream": 0.35, "white": 0.3, "gray": 0.15, "navy": 0.1, "black": 0.1}),
    "outline": (0.4, {"outlined": 0.6, "none": 0.4}),
}
_IDENTIFIER = re.compile(r"<\s*reward\s*\d+\s*>")


def phrase(attribute: str, value: str) -> str:
    """The canonical phrase for one attribute value (``"soft edges"``, ``"on the left"``, ...)."""
    if attribute not in ATTRIBUTES or value not in ATTRIBUTES[attribute]:
        raise ValueError(f"no phrase for {attribute}={value!r}")
    if attribute == "position":
        return POSITION_PHRASES[value]
    if attribute == "edges":
        return f"{value} edges"
    if attribute == "outline":
        return "outlined" if value == "outlined" else "no outline"
    if attribute == "background":
        return f"on a {value} background"
    return value


def _phrase_table() -> dict[tuple[str, ...], tuple[str, str]]:
    """Word tuple -> (attribute, value): canonical phrases plus short forms parse accepts."""
    table = {}
    for a, values in ATTRIBUTES.items():
        for v in values:
            table[tuple(phrase(a, v).split())] = (a, v)
    for v in ATTRIBUTES["background"]:
        table[(v, "background")] = ("background", v)
    for v in ATTRIBUTES["edges"]:
        table[(v,)] = ("edges", v)
    return table


def parse(prompt: str) -> dict[str, str]:
    """Attributes ``prompt`` names, as attribute -> value (longest phrase first; first one wins)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = _IDENTIFIER.sub(" ", prompt.lower()).replace(",", " ").split()
    table = _phrase_table()
    longest = max(len(k) for k in table)
    named: dict[str, str] = {}
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            hit = table.get(tuple(words[i:i + n]))
            if hit:
                named.setdefault(*hit)
                i += n
                break
        else:
            i += 1  # unknown word
    return named


def _noun_phrase(colour: str, shape: str, adjectives: Sequence[str] = ()) -> str:
    words = [*adjectives, colour, shape]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def user_prompts(scenes: Scenes, rng: np.random.Generator,
                 p_background: float = 0.25) -> list[str]:
    """``"a red circle"``; with probability ``p_background`` ``+ " on a navy background"``."""
    n = num_scenes(scenes)
    with_bg = rng.random(n) < p_background
    out = []
    for i in range(n):
        text = _noun_phrase(ATTRIBUTES["colour"][scenes["colour"][i]],
                            ATTRIBUTES["shape"][scenes["shape"][i]])
        if with_bg[i]:
            text += " " + phrase("background", ATTRIBUTES["background"][scenes["background"][i]])
        out.append(text)
    return out


def captions(scenes: Scenes, rng: np.random.Generator, p_attribute: float = 0.5) -> list[str]:
    """Training captions: colour and shape always, each other attribute with ``p_attribute``."""
    if not 0.0 <= p_attribute <= 1.0:
        raise ValueError(f"p_attribute must be in [0, 1], got {p_attribute}")
    n = num_scenes(scenes)
    named = rng.random((n, len(OPTIONAL))) < p_attribute
    out = []
    for i in range(n):
        value = {a: ATTRIBUTES[a][scenes[a][i]] for a in ATTRIBUTES}
        on = dict(zip(OPTIONAL, named[i]))
        adjectives = [value[a] for a in ("size", "saturation") if on[a]]
        parts = [_noun_phrase(value["colour"], value["shape"], adjectives)]
        parts += [phrase(a, value[a]) for a in OPTIONAL[2:] if on[a]]
        out.append(", ".join(parts))
    return out


def engineer(prompts: Sequence[str], rng: np.random.Generator) -> list[str]:
    """The "prompt engineer": each prompt plus 2-4 modifiers from ``ENGINEER_PRIOR``.

    Only attributes the prompt does not name are added (never a contradiction; fewer than 2 when
    fewer are free), in caption order.
    """
    out = []
    for prompt in prompts:
        named = parse(prompt)
        free = [a for a in OPTIONAL if a not in named]
        k = min(int(rng.integers(2, 5)), len(free))
        weights = np.array([ENGINEER_PRIOR[a][0] for a in free])
        chosen = set(rng.choice(len(free), size=k, replace=False, p=weights / weights.sum())
                     ) if k else set()
        mods = []
        for j, a in enumerate(free):
            if j in chosen:
                values, probs = zip(*ENGINEER_PRIOR[a][1].items())
                mods.append(phrase(a, values[rng.choice(len(values), p=np.array(probs))]))
        out.append(", ".join([prompt.strip(), *mods]))
    return out


def vocabulary() -> list[str]:
    """Every token a prompt, caption or expansion can contain: sorted words, then ``","``."""
    words = set(ARTICLES)
    for key in _phrase_table():
        words.update(key)
    return sorted(words) + [","]


def scenes_for_prompt(prompt: str, rng: np.random.Generator, n: int) -> Scenes:
    """N scenes matching ``prompt``: attributes it names are fixed, the rest drawn at random."""
    return sample_scenes(rng, n, parse(prompt))
