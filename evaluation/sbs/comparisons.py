"""Which SBS comparisons exist: a small registry of ``Comparison`` records naming two lineage models.

A lineage model is ``stage:<stage>`` (a report Table 4 stage; its published pipeline folder is found through the
stage asset's latest materialization) or ``folder:<absolute path>`` (an external released pipeline folder). The
comparison key, used as the Dagster partition key and as the folder name under ``K5_HOME/sbs/``, is
``<name A>_vs_<name B>``; model A is model 1 everywhere (plan, store, scores, reports).

Only comparisons that can succeed are offered: stage references must name Table 4 stages (checked when the record
is built), and a ``folder:`` model is offered only while its folder holds a ``model_index.json``. Besides the built-in
registry, a lab declares its own comparisons (e.g. against a released folder) in a JSON file (``load_comparisons``;
the Dagster code location reads ``K5_HOME/sbs/comparisons.json``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from k5model.training.stages import CHAINS, TABLE4

STAGE = "stage"
FOLDER = "folder"
SFT = "sft"  # a model recorded by the sft_soup asset (report §6.4): the soup, its start stage, its best member
SFT_REFS = ("soup", "pretrain", "best_single_domain")
DISTILL = "distill"  # a distilled model recorded by its asset (report §6.5): ``distill:flash``
DISTILL_REFS = ("cfg_distilled", "tscd_16nfe", "flash")
RL = "rl"  # the DRaFT-K model of the rl_model asset (report §6.6): ``rl:rl``
RL_ASSET = "rl_model"
FLASH_TEACHER_STAGE = CHAINS["video_lite"][-1]  # the teacher of the distillation assets (assets.distill)


@dataclass(frozen=True, kw_only=True)
class LineageModel:
    """One side of a comparison."""

    kind: str
    """``"stage"`` (a Table 4 stage trained by its ``train_<stage>`` asset) or ``"folder"`` (an external pipeline)."""
    ref: str
    """Stage name, or the absolute path of the pipeline folder."""

    def __post_init__(self) -> None:
        if self.kind == STAGE:
            if self.ref not in TABLE4:
                raise ValueError(f"stage:{self.ref} is not a Table 4 stage; choose one of {', '.join(TABLE4)}")
        elif self.kind == FOLDER:
            if not Path(self.ref).is_absolute():
                raise ValueError(f"folder:{self.ref} must be an absolute path to a pipeline folder")
        elif self.kind == SFT:
            if self.ref not in SFT_REFS:
                raise ValueError(f"sft:{self.ref} is not one of {', '.join(SFT_REFS)}")
        elif self.kind == DISTILL:
            if self.ref not in DISTILL_REFS:
                raise ValueError(f"distill:{self.ref} is not one of {', '.join(DISTILL_REFS)}")
        elif self.kind == RL:
            if self.ref != RL:
                raise ValueError(f"rl:{self.ref} is not a model of the rl_model asset; write 'rl:rl'")
        else:
            raise ValueError(f"unknown lineage model kind {self.kind!r}: use 'stage:<stage>', 'folder:<path>' or "
                             f"'sft:<{'|'.join(SFT_REFS)}>'")

    @classmethod
    def parse(cls, text: str) -> LineageModel:
        """``"stage:video_lite_lr"`` or ``"folder:/abs/path"``."""
        kind, sep, ref = text.partition(":")
        if not sep or not ref:
            raise ValueError(f"{text!r} is not a lineage model: write 'stage:<stage>' or 'folder:<absolute path>'")
        return cls(kind=kind, ref=ref)

    @property
    def name(self) -> str:
        """Short name used in comparison keys, plots and MLflow: the stage, or the folder's base name."""
        if self.kind in (STAGE, SFT, DISTILL, RL):
            return self.ref
        return re.sub(r"[^A-Za-z0-9_]+", "_", Path(self.ref).name).strip("_") or "folder"

    @property
    def asset_key(self) -> str | None:
        """Dagster asset that produces the model (stages, and ``sft_soup`` for the SFT models)."""
        if self.kind == DISTILL:
            return self.ref
        if self.kind == RL:
            return RL_ASSET
        return f"train_{self.ref}" if self.kind == STAGE else "sft_soup" if self.kind == SFT else None

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """One side-by-side comparison: model A (model 1) against model B (model 2) on one prompt set."""

    model_a: LineageModel
    """Model 1: usually the newer stage or the candidate."""
    model_b: LineageModel
    """Model 2: the baseline."""
    prompt_set: str
    """``"moviegen"`` (video models) or ``"parti"`` (image models)."""
    description: str = ""
    """One line for the Dagster UI and the report."""

    def __post_init__(self) -> None:
        if self.prompt_set not in ("moviegen", "parti"):
            raise ValueError(f"prompt_set must be 'moviegen' or 'parti', got {self.prompt_set!r}")
        if str(self.model_a) == str(self.model_b):
            raise ValueError(f"a comparison needs two different models, got {self.model_a} twice")

    @property
    def key(self) -> str:
        return f"{self.model_a.name}_vs_{self.model_b.name}"

    @property
    def models(self) -> tuple[LineageModel, LineageModel]:
        return self.model_a, self.model_b

    def can_run(self) -> bool:
        """False only for a ``folder:`` model whose folder is not a pipeline (stages and SFT models are produced by
        their assets)."""
        return all(m.kind in (STAGE, SFT, DISTILL, RL) or (Path(m.ref) / "model_index.json").is_file()
                   for m in self.models)


def _prompt_set_of_chain(chain: str) -> str:
    return "parti" if chain.startswith("image") else "moviegen"


def stage_comparison(a: str, b: str, description: str = "") -> Comparison:
    """Stage ``a`` (model A) against stage ``b``; the prompt set follows the chain of ``a``."""
    chain = next(c for c, stages in CHAINS.items() if a in stages)
    return Comparison(model_a=LineageModel(kind=STAGE, ref=a), model_b=LineageModel(kind=STAGE, ref=b),
                      prompt_set=_prompt_set_of_chain(chain), description=description)


def _registry() -> list[Comparison]:
    video_lite = CHAINS["video_lite"]
    out = [stage_comparison(video_lite[-1], video_lite[0],
                            "demo: the last Video Lite stage (MR 10 s, NABLA) against the first (T2I LR)")]
    # Every stage against the stage it started from: what did this stage add?
    for chain, stages in CHAINS.items():
        for stage in stages:
            parent = TABLE4[stage].parent
            if parent is not None:
                out.append(stage_comparison(stage, parent, f"{chain}: {stage} against its parent {parent}"))
    # SFT (report §6.4): the soup against the stage it was fine-tuned from, and against its best single member
    soup = LineageModel(kind=SFT, ref="soup")
    out += [Comparison(model_a=soup, model_b=LineageModel(kind=SFT, ref=ref), prompt_set="moviegen",
                       description=f"SFT soup (sft_soup) against {what}")
            for ref, what in (("pretrain", "the pre-trained stage it started from"),
                              ("best_single_domain", "its member with the lowest validation loss"))]
    # Distillation (report §6.5): the 16-NFE Flash model (its own sampling settings) against its teacher
    out.append(Comparison(model_a=LineageModel(kind=DISTILL, ref="flash"),
                          model_b=LineageModel(kind=STAGE, ref=FLASH_TEACHER_STAGE), prompt_set="moviegen",
                          description=f"Flash (16 NFE, guidance 1) against its teacher {FLASH_TEACHER_STAGE}"))
    # RL (report §6.6): the DRaFT-K model against the SFT soup it started from
    out.append(Comparison(model_a=LineageModel(kind=RL, ref=RL), model_b=soup, prompt_set="moviegen",
                          description="RL model (rl_model, DRaFT-K) against the SFT soup it started from"))
    return out


COMPARISONS: dict[str, Comparison] = {c.key: c for c in _registry()}
DEMO_COMPARISON: str = COMPARISONS[f"{CHAINS['video_lite'][-1]}_vs_{CHAINS['video_lite'][0]}"].key


def _default_prompt_set(model: LineageModel) -> str:
    if model.kind == STAGE:
        return _prompt_set_of_chain(next(c for c, stages in CHAINS.items() if model.ref in stages))
    folder = Path(model.ref)
    return "parti" if (folder / "model_index.json").is_file() and pipeline_media_kind(folder) == "image" else "moviegen"


def load_comparisons(path: Path) -> list[Comparison]:
    """Comparisons declared in a JSON file, e.g. a trained stage against a released pipeline folder:
    ``[{"model_a": "stage:video_lite_mr_10s", "model_b": "folder:/releases/k5-video_lite-v3",
    "prompt_set": "moviegen", "description": "..."}]`` (``prompt_set`` and ``description`` optional; the prompt set
    follows model A's media kind). Raises ValueError naming the file and the entry that is wrong."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise ValueError("the file must hold a JSON list of comparisons")
        out = []
        for n, e in enumerate(entries):
            try:
                a, b = LineageModel.parse(e["model_a"]), LineageModel.parse(e["model_b"])
                out.append(Comparison(model_a=a, model_b=b, prompt_set=e.get("prompt_set") or _default_prompt_set(a),
                                      description=e.get("description", "")))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"entry {n} ({e!r}): {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return out


def registry(extra_file: Path | None = None) -> dict[str, Comparison]:
    """The built-in comparisons plus those declared in ``extra_file`` (when it exists), by key."""
    out = dict(COMPARISONS)
    if extra_file is not None and Path(extra_file).is_file():
        for c in load_comparisons(extra_file):
            if c.key in out and out[c.key] != c:
                raise ValueError(f"{extra_file}: comparison {c.key!r} is already defined differently")
            out[c.key] = c
    return out


def offered(comparisons: Iterable[Comparison] | None = None) -> list[str]:
    """Partition keys: every comparison (default: the built-in registry) that can run, in order."""
    pool = COMPARISONS.values() if comparisons is None else comparisons
    return [c.key for c in pool if c.can_run()]


def get_comparison(key: str, comparisons: dict[str, Comparison] | None = None) -> Comparison:
    pool = COMPARISONS if comparisons is None else comparisons
    if key not in pool:
        raise KeyError(f"unknown SBS comparison {key!r}; registered: {', '.join(pool)}")
    return pool[key]


def stages_referenced(comparisons: Iterable[Comparison] | None = None) -> list[str]:
    """Every stage some comparison uses (Table 4 order): the ``train_<stage>`` deps of the SBS assets."""
    pool = COMPARISONS.values() if comparisons is None else comparisons
    used = {m.ref for c in pool for m in c.models if m.kind == STAGE}
    return [s for s in TABLE4 if s in used]


def resolve_model(model: LineageModel, stage_pipeline: Callable[[str], Path],
                  sft_pipeline: Callable[[str], Path] | None = None,
                  asset_pipeline: Callable[[str], Path] | None = None) -> Path:
    """The pipeline folder of a lineage model. ``stage_pipeline(stage)`` says where a stage published its pipeline
    (the orchestration layer reads it from the stage asset's materialization), ``sft_pipeline(ref)`` where the
    ``sft_soup`` asset recorded an SFT model, ``asset_pipeline(asset)`` where a distillation asset recorded its
    export. Raises FileNotFoundError naming what to materialize or fix when the
    folder is not a complete pipeline."""
    if model.kind == SFT and sft_pipeline is None:
        raise FileNotFoundError(f"{model}: no sft_soup materialization to read it from; materialize sft_soup first")
    if model.kind in (DISTILL, RL) and asset_pipeline is None:
        raise FileNotFoundError(f"{model}: no {model.ref} materialization to read it from; materialize it first")
    path = (Path(model.ref) if model.kind == FOLDER else Path(sft_pipeline(model.ref)) if model.kind == SFT  # type: ignore[misc]
            else Path(asset_pipeline(str(model.asset_key))) if model.kind in (DISTILL, RL)  # type: ignore[misc]
            else Path(stage_pipeline(model.ref)))
    if not (path / "model_index.json").is_file():
        fix = f"materialize {model.asset_key} first" if model.asset_key else "point it at a pipeline folder"
        raise FileNotFoundError(f"{model}: no pipeline at {path} (no model_index.json); {fix}")
    return path


def pipeline_media_kind(folder: Path) -> str:
    """"image" for a T2I pipeline folder, else "video" (from ``model_index.json``)."""
    cls = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "")
    return "image" if "T2I" in cls else "video"
