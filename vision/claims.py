"""Atomic claims of a free-text scene description, and verifiers that check them.

:func:`parse_claims` is a rule-based parser over a small controlled vocabulary (the colours of
:data:`vision.synthetic.PALETTE`, circle / square / triangle, the generic nouns "shape" / "object" / ...,
number words and digits, and the 3 x 3 cell names of :mod:`vision.describe_scene`). Each sentence is cut
into clauses (at ``.;,``, "and", "while", ...); in each clause every shape noun with its determiner, number
and colour is a *mention*. What a mention claims:

===========================================  =================================================================
mention                                       claim
===========================================  =================================================================
"a red circle", "the circle", "a blue item"   **exists**: at least one (a colour or a shape word is named)
"circles", "some red objects"                 **exists**: at least two
"one red circle", "two squares", "3 shapes"   **count**: exactly that many ("two shapes": the total count)
"no triangles", "there aren't any shapes"     **count**: zero (a negated clause; everything else is dropped)
"a red circle in the top left"                **position**: some matching object is in that cell
"a shape in the center"                       **position** only (which cell is specific, "a shape" is not)
"a shape", "shapes", "some objects"           *nothing*: a generic noun with no number and no colour
"shape shapes shapes", "circle circles"       *nothing more*: a noun right after a noun is a stutter
===========================================  =================================================================

A claim must be *specific* to count: "there is a shape" or "there are shapes" is true of every picture of
this task, so it says nothing checkable about *this* image, and counting it would pay a policy for
repeating it (GRPO on the tiny model collapsed to "There is shape shapes shapes ..." under such a parser:
precision 1 and two supported claims for free). A generic noun counts only with a number (the total
count, "There are two shapes", is a real claim) or a colour ("a blue object"). Positions: a position in
the same clause ("In the center there is a square") belongs to the clause's one singular mention; a
position alone in a clause ("In the top left, ...") carries over to the next clause's mention; plural
mentions get no position (which one would it be?), nor do mentions sharing a clause. Sentences that
mention no shape noun give no claims. Identical claims count once, so repeating a sentence adds no detail.

:class:`Verifier` is the interface both verifiers implement: ``verify(descriptions, scenes, images)`` gives
one :class:`Verdict` per description, or None when that description could not be checked (a judge that
answered garbage). :class:`SceneGraphVerifier` is exact, against the row's scene; the model judge lives in
:mod:`vision.judge`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from vision.describe_scene import NUMBER_WORDS, POSITION_NAMES, objects_of
from vision.synthetic import PALETTE, SHAPES

KINDS = ("exists", "count", "position")
_COLOURS = {**{c: c for c in PALETTE}, "grey": "gray", "violet": "purple"}
_SHAPE_NOUNS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}, "shape": None, "shapes": None,
                "object": None, "objects": None, "thing": None, "things": None, "item": None, "items": None,
                "figure": None, "figures": None}
_PLURALS = {n for n in _SHAPE_NOUNS if n.endswith("s")}
_NUMBERS = {**{w: i for i, w in enumerate(NUMBER_WORDS)}, "single": 1, "no": 0, "zero": 0}
_EXISTENTIAL = {"a", "an", "the", "some", "several", "many", "another", "any"}
# Words allowed between a determiner and the noun without changing what is claimed.
_FILLERS = {"small", "large", "big", "little", "solid", "filled", "bright", "dark", "light", "single", "lone",
            "only", "just", "exactly", "of", "them", "coloured", "colored", "shaped"}
_NEGATIONS = {"not", "never", "isn", "aren", "doesn", "don", "without", "neither", "nor"}
_CLAUSE_SPLIT = re.compile(r"[.;,:!?\n]+|\b(?:and|while|but|whereas|plus)\b", re.IGNORECASE)
_TOKEN = re.compile(r"[a-z]+|\d+")
_VERTICAL = {"top": 0, "upper": 0, "bottom": 2, "lower": 2}
_HORIZONTAL = {"left": 0, "right": 2}
_CENTRE = {"center", "centre", "middle", "central"}


@dataclass(frozen=True)
class Claim:
    """One atomic claim. ``colour``/``shape`` None mean "any"; ``count`` is the exact number (``count``),
    or the minimum (``exists``); ``position`` is a cell name of :data:`POSITION_NAMES`. ``text`` is the
    clause it came from (not compared: the same claim from two sentences is one claim)."""

    kind: str
    colour: str | None = None
    shape: str | None = None
    count: int = 1
    position: str | None = None
    text: str = field(default="", compare=False)

    def describe(self) -> str:
        noun = " ".join(w for w in (self.colour, self.shape or "shape") if w)
        if self.kind == "count":
            return f"there are exactly {self.count} {noun}(s)"
        if self.kind == "position":
            return f"a {noun} is in the {self.position} cell"
        return f"there is at least {self.count} {noun}" + ("s" if self.count > 1 else "")


def _cell(tokens: list[str]) -> str | None:
    """The cell a clause names, from its position words; None when it names none."""
    row = next((_VERTICAL[t] for t in tokens if t in _VERTICAL), None)
    col = next((_HORIZONTAL[t] for t in tokens if t in _HORIZONTAL), None)
    if row is None and col is None:
        return POSITION_NAMES[(1, 1)] if any(t in _CENTRE for t in tokens) else None
    return POSITION_NAMES[(1 if row is None else row, 1 if col is None else col)]


def _mentions(tokens: list[str]) -> list[tuple[int, str | None, str | None, int | None, bool]]:
    """(index, colour, shape, number or None, plural) for each shape noun of a clause."""
    found = []
    for i, tok in enumerate(tokens):
        if tok not in _SHAPE_NOUNS or (i > 0 and tokens[i - 1] in _SHAPE_NOUNS):
            continue  # not a noun, or a stutter ("shape shapes", "circle circles"): no new mention
        colour, number, j = None, None, i - 1
        while j >= 0 and (tokens[j] in _COLOURS or tokens[j] in _FILLERS):
            colour = colour or _COLOURS.get(tokens[j])
            j -= 1
        if j >= 0 and (tokens[j] in _NUMBERS or tokens[j].isdigit()):
            number = int(tokens[j]) if tokens[j].isdigit() else _NUMBERS[tokens[j]]
        if colour is None and i + 2 < len(tokens) and tokens[i + 1] in ("is", "are") and tokens[i + 2] in _COLOURS:
            colour = _COLOURS[tokens[i + 2]]  # "the circle is red"
        found.append((i, colour, _SHAPE_NOUNS[tok], number, tok in _PLURALS))
    return found


def parse_claims(text: str) -> list[Claim]:
    """The atomic claims of ``text``, in order of appearance, each once (see the module docstring)."""
    claims: list[Claim] = []
    pending: str | None = None  # a position from a clause that named no object ("In the top left, ...")
    for clause in _CLAUSE_SPLIT.split(text or ""):
        tokens = _TOKEN.findall(clause.lower())
        mentions = _mentions(tokens)
        cell = _cell([t for t in tokens if t not in _SHAPE_NOUNS])
        if not mentions:
            pending = cell or pending
            continue
        negated = any(t in _NEGATIONS for t in tokens)
        cell = cell or pending
        pending = None
        for _, colour, shape, number, plural in mentions:
            source = clause.strip()
            if negated:
                if number is None:
                    claims.append(Claim("count", colour, shape, 0, text=source))
                continue
            if number is not None:
                claims.append(Claim("count", colour, shape, number, text=source))
            elif colour is not None or shape is not None:  # "a shape", "objects": true of every picture
                claims.append(Claim("exists", colour, shape, 2 if plural else 1, text=source))
            if cell is not None and not plural and number in (None, 1) and len(mentions) == 1:
                claims.append(Claim("position", colour, shape, 1, cell, text=source))
    return list(dict.fromkeys(claims))


def _matches(obj: dict[str, Any], claim: Claim) -> bool:
    return (claim.colour is None or obj["colour"] == claim.colour) and (
        claim.shape is None or obj["shape"] == claim.shape)


def check_claim(claim: Claim, scene: dict[str, Any]) -> bool:
    """Whether ``claim`` holds in ``scene`` (a ``describe_scene`` scene)."""
    objects = [o for o in objects_of(scene) if _matches(o, claim)]
    if claim.kind == "count":
        return len(objects) == claim.count
    if claim.kind == "exists":
        return len(objects) >= claim.count
    return any(POSITION_NAMES[(o["row"], o["col"])] == claim.position for o in objects)


@dataclass(frozen=True)
class Verdict:
    """What a verifier found in one description: its claims, which of them hold, and how relevant the
    description is to the image (in [0, 1])."""

    claims: tuple[str, ...]
    supported: tuple[bool, ...]
    relevance: float

    @property
    def num_claims(self) -> int:
        return len(self.claims)

    @property
    def num_supported(self) -> int:
        return sum(self.supported)


class Verifier(Protocol):
    """Checks descriptions of images: one :class:`Verdict` per description, None where it could not."""

    def verify(self, descriptions: Sequence[str], scenes: Sequence[dict[str, Any] | None],
               images: Sequence[Image.Image | None]) -> list[Verdict | None]: ...


def scene_relevance(claims: Sequence[Claim], supported: Sequence[bool], scene: dict[str, Any]) -> float:
    """Object coverage: the fraction of the scene's objects that a supported claim names by both colour
    and shape ("a red circle", "two blue squares"; not "no red circles"). It measures whether the text talks
    about *this* picture's objects: a total count ("There are four shapes."), a colour alone ("a blue
    object") or a text with no claim (a refusal, "There is shape shapes ...") scores 0, and a description
    naming each object scores 1. Listing every colour and shape to name all objects is paid for in
    precision."""
    objects = objects_of(scene)
    if not objects:
        return 0.0
    named = {(c.colour, c.shape) for c, ok in zip(claims, supported) if ok and c.colour and c.shape
             and not (c.kind == "count" and c.count == 0)}
    return sum((o["colour"], o["shape"]) in named for o in objects) / len(objects)


class SceneGraphVerifier:
    """Exact verification against the row's scene: :func:`parse_claims`, then :func:`check_claim` each.
    A row without a scene cannot be checked (None)."""

    def verify(self, descriptions: Sequence[str], scenes: Sequence[dict[str, Any] | None],
               images: Sequence[Image.Image | None] | None = None) -> list[Verdict | None]:
        verdicts: list[Verdict | None] = []
        for text, scene in zip(descriptions, scenes, strict=True):
            if not isinstance(scene, dict) or "objects" not in scene:
                verdicts.append(None)
                continue
            claims = parse_claims(text)
            supported = [check_claim(c, scene) for c in claims]
            verdicts.append(Verdict(tuple(c.describe() for c in claims), tuple(supported),
                                    scene_relevance(claims, supported, scene)))
        return verdicts
