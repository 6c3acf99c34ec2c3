"""The SFT questionnaires (report §4.6, Figure 8): Stage 1 technical screening by regular annotators, Stage 2 expert
questionnaires (11 image criteria, 13 video criteria, 5 extra criteria for images containing text).

Every question has a fixed option list and the subset of options that count as "good" for the consensus. Three
questions describe the content rather than judge it (video dynamics high/low, content complexity, poster/cover
category): they are asked and recorded as attributes, but take no part in the "good on all criteria" consensus, since
no answer to them is a defect (``Question.descriptive``).
"""

from __future__ import annotations

from dataclasses import dataclass

REGULAR, EXPERT = "regular", "expert"
ROLES = (REGULAR, EXPERT)
STAGE_SCREENING, STAGE_EXPERT = 1, 2

GRADED = ("good", "acceptable", "bad")  # default Stage 2 scale; only "good" counts for the consensus
YES_NO = ("yes", "no")


@dataclass(frozen=True, kw_only=True)
class Question:
    """One criterion of a questionnaire."""

    key: str
    """Stable identifier stored with each answer."""
    label: str
    """The question as shown to the annotator."""
    options: tuple[str, ...] = GRADED
    """Answers offered, in button order."""
    good: frozenset[str] = frozenset({"good"})
    """Answers that count as "good" (Stage 2) or "pass" (Stage 1)."""
    descriptive: bool = False
    """Describes the content (no defect possible): recorded, excluded from the consensus."""


def _q(key: str, label: str, options: tuple[str, ...] = GRADED, good: tuple[str, ...] = ("good",),
       descriptive: bool = False) -> Question:
    return Question(key=key, label=label, options=options, good=frozenset(good), descriptive=descriptive)


STAGE1 = (
    _q("main_object", "Is there a clear, prominent main object?", YES_NO, ("yes",)),
    _q("framing", "Is the cropping / framing proper (nothing important cut off)?", YES_NO, ("yes",)),
    _q("depth", "Is there a sense of spatial depth?", YES_NO, ("yes",)),
    _q("no_artifacts", "Is it free of visual artifacts (blur, noise, compression, glitches)?", YES_NO, ("yes",)),
)

_HORIZON = ("level", "no horizon", "tilted")
IMAGE_CRITERIA = (
    _q("img_exposure_contrast", "Exposure and contrast are correct"),
    _q("img_horizon", "Horizon line positioning", _HORIZON, ("level", "no horizon")),
    _q("img_composition_geometry", "Composition geometry"),
    _q("img_silhouette", "Object silhouette quality"),
    _q("img_lighting_color", "Lighting and color scheme"),
    _q("img_no_unwanted_objects", "Absence of unwanted objects", YES_NO, ("yes",)),
    _q("img_artistic_expressiveness", "Overall artistic expressiveness"),
    _q("img_natural_not_ai", "Looks natural, not AI-generated", YES_NO, ("yes",)),
    _q("img_organic_integration", "Organic integration of all elements"),
    _q("img_no_modifications_needed", "Usable without modifications (no retouching / crop needed)", YES_NO, ("yes",)),
    _q("img_wow_factor", "Exceptional \"wow factor\"", ("wow", "nice", "ordinary"), ("wow", "nice")),
)

VIDEO_CRITERIA = (
    _q("vid_integrity", "Video integrity and completeness (no cuts, freezes, missing parts)"),
    _q("vid_clarity", "Clarity of content and action"),
    _q("vid_main_object", "Main object presence and highlighting"),
    _q("vid_dynamics", "Dynamic properties", ("high", "low", "static"), ("high", "low", "static"), descriptive=True),
    _q("vid_color_grading", "Color solution and grading"),
    _q("vid_framing", "Framing correctness"),
    _q("vid_horizon", "Horizon line positioning", _HORIZON, ("level", "no horizon")),
    _q("vid_composition", "Composition quality (rule of thirds, central, diagonal)"),
    _q("vid_depth", "Depth and volumetrics"),
    _q("vid_exposure", "Exposure correctness"),
    _q("vid_editing_suitability", "Suitability for editing", YES_NO, ("yes",)),
    _q("vid_complexity", "Complexity of content", ("complex", "medium", "simple"), ("complex", "medium", "simple"),
       descriptive=True),
    _q("vid_aesthetics", "Aesthetic and artistic expression"),
)

TEXT_CRITERIA = (
    _q("txt_legibility", "Text clarity and legibility"),
    _q("txt_overlay_integration", "Appropriate text overlay integration"),
    _q("txt_no_letter_distortion", "Absence of unusual letter distortions", YES_NO, ("yes",)),
    _q("txt_background_harmony", "Harmonious text-background relationship"),
    _q("txt_poster_cover", "Poster / cover design?", ("poster or cover", "other"), ("poster or cover", "other"),
       descriptive=True),
)

ALL_QUESTIONS = {q.key: q for q in STAGE1 + IMAGE_CRITERIA + VIDEO_CRITERIA + TEXT_CRITERIA}


def questions_for(stage: int, kind: str, has_text: bool = False) -> tuple[Question, ...]:
    """The questionnaire of ``stage`` for an item of ``kind`` ("image" / "video"); text criteria for images with
    text."""
    if stage == STAGE_SCREENING:
        return STAGE1
    if stage != STAGE_EXPERT:
        raise ValueError(f"stage {stage!r} does not exist; use 1 (screening) or 2 (expert)")
    if kind == "video":
        return VIDEO_CRITERIA
    if kind == "image":
        return IMAGE_CRITERIA + (TEXT_CRITERIA if has_text else ())
    raise ValueError(f"media kind {kind!r} has no questionnaire; use 'image' or 'video'")


def consensus_questions(kind: str, has_text: bool = False) -> tuple[Question, ...]:
    """Stage 2 questions that take part in the "good" consensus (descriptive ones left out)."""
    return tuple(q for q in questions_for(STAGE_EXPERT, kind, has_text) if not q.descriptive)


def question(key: str) -> Question:
    try:
        return ALL_QUESTIONS[key]
    except KeyError:
        raise ValueError(f"unknown SFT criterion {key!r}") from None
