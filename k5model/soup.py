"""Model soups (report §6.4): weighted averages of fine-tuned CrossDiT transformers, streamed from safetensors.

Weights: ``equal`` (1/N), ``size`` (proportional to the ingredients' training-set sizes) and ``sqrt_size``
(proportional to their square roots). Images use the hierarchical recipe: the subdomain models of one domain are
weighted by sqrt size inside the domain, then the 9 domain soups by a top-level scheme. That is linear, so it is
flattened into one weight per subdomain model and merged in a single pass; video is uniform over its 9 domains.

``merge_streamed`` never holds a whole model: it walks the output tensors in chunks of at most ``chunk_numel``
elements (a large tensor is split by rows), reads each member's rows of that chunk with ``safe_open`` (a memory map,
closed again after every chunk so mapped pages do not pile up), accumulates ``w_i * x_i`` in fp32, casts back to the
members' dtype and appends the bytes to the output safetensors file, whose header is written first (all shapes are
known up front). Peak memory is about 4 fp32 chunks (three reused buffers and one member's mapped rows), whatever
the model size or the number of members; figures in docs/benchmarks.md (streamed model soup).

torch and safetensors are imported inside the merge functions: the recipe and the weights stay light (the ``k5``
CLI builds its options from the recipe without importing torch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from k5model.config import CrossDiTConfig

if TYPE_CHECKING:
    import torch

Scheme = Literal["equal", "size", "sqrt_size"]
WeightsKind = Literal["ema", "raw"]
SCHEMES: tuple[str, ...] = ("equal", "size", "sqrt_size")
WEIGHTS_KINDS: tuple[str, ...] = ("ema", "raw")
METADATA_KEY = "k5_soup"  # safetensors __metadata__ entry holding the recipe and the per-member weights (JSON)
DEFAULT_CHUNK_NUMEL = 8 * 2**20  # 32 MiB of fp32 accumulator per chunk
DEFAULT_MAX_SHARD_SIZE = 10 * 2**30  # same default as checkpoint.save_transformer_folder

# safetensors dtype names of the floating types a soup can average -> (torch dtype name, bytes per element)
_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2)}
# diffusers file names (the same constants as k5model.checkpoint, which imports torch)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, _DTYPES[name][0])


class SoupError(ValueError):
    """Soup members that cannot be averaged (different tensors, shapes, dtypes or model configs) or a bad recipe."""


def soup_weights(sizes: Sequence[float], scheme: str) -> list[float]:
    """Normalised weights of ingredients trained on ``sizes`` items: ``equal`` 1/N, ``size`` n_i / sum(n),
    ``sqrt_size`` sqrt(n_i) / sum(sqrt(n))."""
    if scheme not in SCHEMES:
        raise SoupError(f"unknown soup scheme {scheme!r}; choose one of {list(SCHEMES)}")
    if not sizes:
        raise SoupError("a soup needs at least one ingredient")
    bad = [s for s in sizes if not (isinstance(s, int | float) and math.isfinite(s) and s > 0)]
    if bad:
        raise SoupError(f"ingredient sizes must be positive numbers, got {bad}")
    if scheme == "equal":
        raw = [1.0] * len(sizes)
    elif scheme == "size":
        raw = [float(s) for s in sizes]
    else:
        raw = [math.sqrt(s) for s in sizes]
    total = sum(raw)
    return [r / total for r in raw]


def infer_weights_kind(path: str | os.PathLike) -> WeightsKind | None:
    """``ema`` or ``raw`` when a component of ``path`` says so (a training run exports ``<run>/ema/transformer``);
    None when the path does not tell."""
    parts = {p.lower() for p in Path(path).parts}
    found = [k for k in WEIGHTS_KINDS if k in parts]
    return found[0] if len(found) == 1 else None


@dataclass(kw_only=True)
class SoupIngredient:
    """One fine-tuned model of a soup."""

    path: str
    """Its transformer folder (config.json + safetensors, possibly sharded) or a pipeline folder holding one."""
    domain: str
    """The domain it was fine-tuned on (one of the VLM domains)."""
    size: int
    """Training items of its (sub)domain; drives the ``size`` and ``sqrt_size`` weights."""
    weights_kind: WeightsKind
    """Which weights of the fine-tune ``path`` holds: ``ema`` (the exponential moving average) or ``raw``."""
    subdomain: str | None = None
    """Its subdomain inside ``domain`` (hierarchical image soups); None for a model of the whole domain."""

    def __post_init__(self) -> None:
        if self.weights_kind not in WEIGHTS_KINDS:
            raise SoupError(f"ingredient {self.path}: weights_kind must be one of {list(WEIGHTS_KINDS)}, "
                            f"got {self.weights_kind!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise SoupError(f"ingredient {self.path}: size must be a positive integer (training items), "
                            f"got {self.size!r}")
        if not self.domain:
            raise SoupError(f"ingredient {self.path}: domain must not be empty")


@dataclass(kw_only=True)
class SoupRecipe:
    """What a soup is made of and how its weights are computed; recorded in the output's safetensors metadata."""

    ingredients: list[SoupIngredient]
    """The fine-tuned models, in merge order."""
    hierarchical: bool = False
    """Two levels: each domain's ingredients by ``subdomain_scheme``, then the domains (sized by the sum of their
    ingredients' sizes) by ``scheme``, flattened into one weight per ingredient. False: ``scheme`` over the
    ingredients directly."""
    scheme: Scheme = "equal"
    """Weighting of the ingredients (flat) or of the domains (hierarchical): equal, size or sqrt_size."""
    subdomain_scheme: Scheme = "sqrt_size"
    """Weighting of the subdomain models inside one domain (hierarchical only; the report uses sqrt_size)."""

    def __post_init__(self) -> None:
        self.ingredients = [i if isinstance(i, SoupIngredient) else SoupIngredient(**i) for i in self.ingredients]
        if not self.ingredients:
            raise SoupError("a soup recipe needs at least one ingredient")
        for name in ("scheme", "subdomain_scheme"):
            if getattr(self, name) not in SCHEMES:
                raise SoupError(f"{name} must be one of {list(SCHEMES)}, got {getattr(self, name)!r}")
        seen: set[str] = set()
        for ing in self.ingredients:
            key = os.path.normpath(os.path.abspath(ing.path))
            if key in seen:
                raise SoupError(f"ingredient {ing.path} is listed twice")
            seen.add(key)
        if self.hierarchical:
            for domain, members in self.by_domain().items():
                subs = [self.ingredients[i].subdomain for i in members]
                if len(members) > 1 and (None in subs or len(set(subs)) != len(subs)):
                    raise SoupError(f"domain {domain!r}: each of its {len(members)} ingredients needs its own "
                                    f"subdomain name, got {subs}")

    def by_domain(self) -> dict[str, list[int]]:
        """Ingredient indices per domain, domains in order of first appearance."""
        groups: dict[str, list[int]] = {}
        for i, ing in enumerate(self.ingredients):
            groups.setdefault(ing.domain, []).append(i)
        return groups

    def leaf_weights(self) -> list[float]:
        """One weight per ingredient (the hierarchical recipe flattened); they sum to 1."""
        sizes = [ing.size for ing in self.ingredients]
        if not self.hierarchical:
            return soup_weights(sizes, self.scheme)
        groups = self.by_domain()
        top = soup_weights([sum(sizes[i] for i in idx) for idx in groups.values()], self.scheme)
        weights = [0.0] * len(sizes)
        for domain_weight, idx in zip(top, groups.values()):
            for i, inner in zip(idx, soup_weights([sizes[i] for i in idx], self.subdomain_scheme)):
                weights[i] = domain_weight * inner
        return weights

    @property
    def paths(self) -> list[str]:
        return [ing.path for ing in self.ingredients]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SoupRecipe:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SoupError(f"unknown soup recipe fields {unknown}; expected {sorted(names)}")
        ing_names = {f.name for f in dataclasses.fields(SoupIngredient)}
        for ing in data.get("ingredients", []):
            bad = sorted(set(ing) - ing_names)
            if bad:
                raise SoupError(f"unknown ingredient fields {bad} in {ing}; expected {sorted(ing_names)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SoupRecipe:
        return cls.from_dict(json.loads(text))

    @classmethod
    def video(cls, ingredients: list[SoupIngredient]) -> SoupRecipe:
        """The report's video soup: uniform average of the domain models."""
        return cls(ingredients=ingredients, hierarchical=False, scheme="equal")

    @classmethod
    def image(cls, ingredients: list[SoupIngredient], *, domain_scheme: Scheme = "equal") -> SoupRecipe:
        """The report's image soup: subdomains -> domain by sqrt size, then the domains by ``domain_scheme``."""
        return cls(ingredients=ingredients, hierarchical=True, scheme=domain_scheme, subdomain_scheme="sqrt_size")


@dataclass
class _Member:
    """A member's transformer folder: which file holds each tensor, and each tensor's dtype name and shape."""

    folder: Path
    files: dict[str, Path]
    specs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)


def _transformer_folder(path: str | os.PathLike) -> Path:
    """``path`` itself, or the ``transformer/`` of a pipeline folder."""
    path = Path(path)
    return path / "transformer" if (path / "model_index.json").is_file() and (path / "transformer").is_dir() else path


def _open_member(path: str | os.PathLike) -> _Member:
    from safetensors import safe_open

    folder = _transformer_folder(path)
    if not (folder / CONFIG_NAME).is_file():
        raise SoupError(f"soup member {path} is not a transformer folder (no {CONFIG_NAME}); pass the transformer "
                        f"folder of a fine-tune (e.g. <run>/ema/transformer) or a pipeline folder")
    if (folder / INDEX_NAME).is_file():
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        files = {k: folder / v for k, v in weight_map.items()}
    elif (folder / WEIGHTS_NAME).is_file():
        files = {}
    else:
        raise SoupError(f"soup member {path} has no {WEIGHTS_NAME} or {INDEX_NAME}")
    member = _Member(folder, files)
    for file in sorted(set(files.values())) or [folder / WEIGHTS_NAME]:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                sl = f.get_slice(key)
                member.specs[key] = (sl.get_dtype(), tuple(sl.get_shape()))
                member.files.setdefault(key, file)
    return member


def _check_members(members: list[_Member]) -> None:
    """Same tensor names, shapes and dtypes in every member (floating dtypes only) and the same model config."""
    ref = members[0]
    for key, (dtype, _) in sorted(ref.specs.items()):
        if dtype not in _DTYPES:
            raise SoupError(f"tensor {key} of {ref.folder} has dtype {dtype}; only floating tensors can be averaged")
    for m in members[1:]:
        for key in sorted(set(ref.specs) | set(m.specs)):
            if key not in m.specs:
                raise SoupError(f"tensor {key} of {ref.folder} is missing from soup member {m.folder}")
            if key not in ref.specs:
                raise SoupError(f"tensor {key} of soup member {m.folder} is not in the first member {ref.folder}")
            if m.specs[key] != ref.specs[key]:
                (d1, s1), (d2, s2) = ref.specs[key], m.specs[key]
                raise SoupError(f"tensor {key}: soup member {m.folder} has shape {list(s2)} {d2}, the first member "
                                f"{ref.folder} has {list(s1)} {d1}")
    ref_cfg = CrossDiTConfig.from_json_file(ref.folder / CONFIG_NAME).to_dict()
    for m in members[1:]:
        cfg = CrossDiTConfig.from_json_file(m.folder / CONFIG_NAME).to_dict()
        diff = [k for k in ref_cfg if cfg[k] != ref_cfg[k]]
        if diff:
            raise SoupError(f"config field {diff[0]} of soup member {m.folder} is {cfg[diff[0]]!r}, the first "
                            f"member {ref.folder} has {ref_cfg[diff[0]]!r}")


def _layout(specs: dict[str, tuple[str, tuple[int, ...]]], max_shard_size: int) -> list[list[str]]:
    """Output tensor order split into shards: widest dtype first (every tensor stays aligned to its element size),
    then by name."""
    order = sorted(specs, key=lambda k: (-_DTYPES[specs[k][0]][1], k))
    shards: list[list[str]] = [[]]
    size = 0
    for key in order:
        nbytes = _nbytes(*specs[key])
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * _DTYPES[dtype][1]


@dataclass(frozen=True)
class _Piece:
    key: str
    rows: tuple[int, int] | None  # None: the whole tensor
    last: bool  # the tensor's final piece


def _pieces(keys: list[str], specs: dict[str, tuple[str, tuple[int, ...]]], chunk_numel: int) -> Iterator[_Piece]:
    for key in keys:
        shape = specs[key][1]
        numel = math.prod(shape)
        if not shape or numel <= chunk_numel:
            yield _Piece(key, None, True)
            continue
        step = max(1, chunk_numel // (numel // shape[0]))
        for r0 in range(0, shape[0], step):
            yield _Piece(key, (r0, min(r0 + step, shape[0])), r0 + step >= shape[0])


def _batches(pieces: Iterator[_Piece], specs: dict, chunk_numel: int) -> Iterator[list[_Piece]]:
    """Consecutive pieces grouped up to ``chunk_numel`` elements, so small tensors share one open of each file."""
    batch: list[_Piece] = []
    numel = 0
    for p in pieces:
        shape = specs[p.key][1]
        n = math.prod(shape) if p.rows is None else (p.rows[1] - p.rows[0]) * math.prod(shape[1:])
        if batch and numel + n > chunk_numel:
            yield batch
            batch, numel = [], 0
        batch.append(p)
        numel += n
    if batch:
        yield batch


def _write_header(f: BinaryIO, keys: list[str], specs: dict, metadata: dict[str, str]) -> int:
    """safetensors header (u64 little-endian length, JSON padded with spaces to 8 bytes); returns the data size."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key in keys:
        dtype, shape = specs[key]
        end = offset + _nbytes(dtype, shape)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    return offset


def _read_rows(f: Any, piece: _Piece) -> torch.Tensor:
    """The piece's rows from an open safetensors file (a view of its memory map, valid while it is open)."""
    return f.get_tensor(piece.key) if piece.rows is None else f.get_slice(piece.key)[piece.rows[0]:piece.rows[1]]


def merge_streamed(
    members: Sequence[str | os.PathLike],
    weights: Sequence[float],
    out_path: str | os.PathLike,
    *,
    recipe: SoupRecipe | None = None,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> Path:
    """Write the transformer folder ``sum_i weights[i] * members[i]`` to ``out_path``.

    Every member is checked first (same tensor names, shapes, dtypes, model config), naming the first mismatching
    tensor and member. Accumulation is in fp32 (``acc += x_i.float() * w_i``, in member order, starting from zero);
    each tensor is cast back to the members' dtype. config.json is the first member's. The recipe (if given), the
    members and their weights are recorded as JSON under ``METADATA_KEY`` in every output shard's metadata.
    The folder is built under a temporary name and renamed into place: ``out_path`` is absent, the previous soup,
    or complete. Returns ``out_path``."""
    if len(members) != len(weights):
        raise SoupError(f"{len(members)} soup members but {len(weights)} weights")
    if not members:
        raise SoupError("a soup needs at least one member")
    weights = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise SoupError(f"soup weights must be non-negative and sum to 1 (a weighted mean), got {weights}; "
                        f"compute them with soup_weights or SoupRecipe.leaf_weights")
    if chunk_numel < 1:
        raise SoupError(f"chunk_numel must be >= 1, got {chunk_numel}")
    from tqdm.auto import tqdm

    opened = [_open_member(m) for m in members]
    out = Path(out_path)
    target = out.resolve()
    clash = [m.folder for m in opened
             if target == m.folder.resolve() or target in m.folder.resolve().parents or m.folder.resolve() in
             target.parents]
    if clash:
        raise SoupError(f"soup output {out} overlaps its member {clash[0]}; write the soup to a folder of its own")
    _check_members(opened)
    specs = opened[0].specs
    shards = _layout(specs, max_shard_size)
    record = {"recipe": recipe.to_dict() if recipe is not None else None,
              "members": [{"path": str(m), "weight": w} for m, w in zip(members, weights)]}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(record, sort_keys=True)}
    names = ([WEIGHTS_NAME] if len(shards) == 1 else
             [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    bar = tqdm(total=len(specs), unit="tensor", desc="soup", disable=not progress)
    try:
        largest_batch = max(sum(math.prod(_piece_shape(p, specs)) for p in batch) for keys in shards
                            for batch in _batches(_pieces(keys, specs, chunk_numel), specs, chunk_numel))
        buffers = _Buffers(largest_batch, max(_DTYPES[d][1] for d, _ in specs.values()))
        for keys, name in zip(shards, names):
            with open(tmp / name, "wb") as f:
                _write_shard_data(f, keys, specs, opened, weights, metadata, chunk_numel, buffers, bar)
        if len(shards) > 1:
            weight_map = {k: name for keys, name in zip(shards, names) for k in keys}
            total = sum(_nbytes(*s) for s in specs.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2))
        shutil.copy2(opened[0].folder / CONFIG_NAME, tmp / CONFIG_NAME)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        bar.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


class _Buffers:
    """The merge's only large allocations, made once: fp32 accumulator and conversion buffers of one chunk, and the
    output bytes of one chunk: 12 bytes per chunk element (8 + the widest member dtype), allocated once so the peak
    does not depend on what the allocator caches between chunks."""

    def __init__(self, numel: int, itemsize: int) -> None:
        import torch

        self.acc = torch.empty(numel, dtype=torch.float32)
        self.conv = torch.empty(numel, dtype=torch.float32)
        self.out = torch.empty(numel * itemsize, dtype=torch.uint8)


def _piece_shape(piece: _Piece, specs: dict) -> tuple[int, ...]:
    shape = specs[piece.key][1]
    return shape if piece.rows is None else (piece.rows[1] - piece.rows[0], *shape[1:])


def _write_shard_data(f: BinaryIO, keys: list[str], specs: dict, members: list[_Member], weights: list[float],
                      metadata: dict[str, str], chunk_numel: int, buffers: _Buffers, bar: Any) -> None:
    """Header then the averaged tensors of one output shard, chunk by chunk: ``acc = 0; acc += x_i.float() * w_i``
    for each member in order, then ``acc`` cast to the members' dtype and appended to ``f``."""
    from safetensors import safe_open

    data_size = _write_header(f, keys, specs, metadata)
    data_start = f.tell()
    for batch in _batches(_pieces(keys, specs, chunk_numel), specs, chunk_numel):
        shapes = [_piece_shape(p, specs) for p in batch]
        starts = [0]
        for shape in shapes:
            starts.append(starts[-1] + math.prod(shape))
        accs = [buffers.acc[a:b].view(shape) for a, b, shape in zip(starts, starts[1:], shapes)]
        buffers.acc[:starts[-1]].zero_()
        for member, w in zip(members, weights):
            by_file: dict[Path, list[int]] = {}
            for j, piece in enumerate(batch):
                by_file.setdefault(member.files[piece.key], []).append(j)
            for file, idx in by_file.items():
                # opened per chunk: closing unmaps the pages read, so resident memory stays at one chunk
                with safe_open(str(file), framework="pt") as st:
                    for j in idx:
                        conv = buffers.conv[starts[j]:starts[j + 1]].view(shapes[j])
                        conv.copy_(_read_rows(st, batch[j]))
                        conv.mul_(w)
                        accs[j].add_(conv)
        for j, piece in enumerate(batch):
            dtype = _torch_dtype(specs[piece.key][0])
            merged = buffers.out[:(starts[j + 1] - starts[j]) * dtype.itemsize].view(dtype).view(shapes[j])
            merged.copy_(accs[j])
            f.write(memoryview(merged.reshape(-1).view(buffers.out.dtype).numpy()))
            if piece.last:
                bar.update(1)
    written = f.tell() - data_start
    if written != data_size:
        raise SoupError(f"internal error: wrote {written} bytes of tensor data, the header says {data_size}")


def soup(recipe: SoupRecipe, out_path: str | os.PathLike, **kwargs: Any) -> Path:
    """``merge_streamed`` of the recipe's ingredients with its flattened weights, the recipe recorded."""
    return merge_streamed(recipe.paths, recipe.leaf_weights(), out_path, recipe=recipe, **kwargs)


def read_soup_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The recipe and per-member weights recorded in a soup's safetensors metadata."""
    from safetensors import safe_open

    member = _transformer_folder(folder)
    files = sorted(member.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise SoupError(f"{folder} has no safetensors weights")
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise SoupError(f"{files[0]} has no {METADATA_KEY!r} metadata: not written by merge_streamed")
    return json.loads(meta[METADATA_KEY])
