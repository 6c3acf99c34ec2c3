"""Reading and writing CrossDiT weights: diffusers ``transformer/`` folders and official single files.

Both formats use the same parameter names, so no key remapping happens anywhere; what differs is the container
(config.json + possibly sharded safetensors vs one bare safetensors file with no config).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from k5model.config import CrossDiTConfig, get_preset

if TYPE_CHECKING:
    from k5model.crossdit import CrossDiT

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match the model it is loaded into."""


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_transformer_folder(model: CrossDiT, directory: str | os.PathLike, *, max_shard_size: int = 10 * 2**30) -> Path:
    """config.json + safetensors, sharded like diffusers (``-0000k-of-0000n`` + index json) past ``max_shard_size``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    # Remove stale weights of an earlier save with a different sharding so the folder is never ambiguous.
    for old in list(directory.glob("diffusion_pytorch_model*.safetensors")) + [directory / INDEX_NAME]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        _save_safetensors(shards[0], directory / WEIGHTS_NAME)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save_safetensors(shard, directory / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        _atomic_write_text(directory / INDEX_NAME,
                           json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _atomic_write_text(directory / CONFIG_NAME, json.dumps(model.config.to_json_dict(), indent=2, sort_keys=True))
    return directory


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def save_single_file(model: CrossDiT, path: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Official layout: one safetensors file; modulation/time weights fp32, the rest in ``dtype``."""
    from k5model.crossdit import KEEP_FP32

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, tensor in model.state_dict().items():
        keep = any(part in KEEP_FP32 for part in key.split("."))
        target = torch.float32 if keep or dtype is None else dtype
        state[key] = tensor.detach().to(target).contiguous().cpu()
    _save_safetensors(state, path)
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a transformer folder (single or sharded) or of a single safetensors file."""
    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    if (path / INDEX_NAME).exists():
        index = json.loads((path / INDEX_NAME).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(str(path / shard)))
        return state
    if (path / WEIGHTS_NAME).exists():
        return load_file(str(path / WEIGHTS_NAME))
    raise CheckpointError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}")


def infer_config(state: dict[str, torch.Tensor], **overrides: Any) -> CrossDiTConfig:
    """Rebuild a config from the tensor shapes of a checkpoint that ships none (official single files).

    Widths and depths are exact; axes_dims cannot be read from shapes, so the official split for the head dim is used
    (64 -> 16/24/24, 128 -> 32/48/48) unless given; attention settings (NABLA) must come from ``overrides``.
    """
    try:
        model_dim, in_text_dim = state["text_embeddings.in_layer.weight"].shape
        time_dim, in_text_dim2 = state["pooled_text_embeddings.in_layer.weight"].shape
        ff_dim = state["visual_transformer_blocks.0.feed_forward.in_layer.weight"].shape[0]
        head_dim = state["visual_transformer_blocks.0.self_attention.query_norm.weight"].shape[0]
        patch_in = state["visual_embeddings.in_layer.weight"].shape[1]
        patch_out = state["out_layer.out_layer.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a Kandinsky 5 CrossDiT checkpoint: tensor {err} is missing") from err
    n_text = len({k.split(".")[1] for k in state if k.startswith("text_transformer_blocks.")})
    n_vis = len({k.split(".")[1] for k in state if k.startswith("visual_transformer_blocks.")})
    axes = {64: (16, 24, 24), 128: (32, 48, 48)}.get(int(head_dim))
    patch = overrides.get("patch_size", (1, 2, 2))
    voxels = patch[0] * patch[1] * patch[2]
    out_dim = patch_out // voxels
    in_ch = patch_in // voxels
    values: dict[str, Any] = dict(
        in_visual_dim=out_dim, out_visual_dim=out_dim, in_text_dim=int(in_text_dim), in_text_dim2=int(in_text_dim2),
        time_dim=int(time_dim), model_dim=int(model_dim), ff_dim=int(ff_dim), num_text_blocks=n_text,
        num_visual_blocks=n_vis, visual_cond=in_ch == 2 * out_dim + 1, patch_size=patch,
    )
    if axes is not None:
        values["axes_dims"] = axes
    values.update(overrides)
    if "axes_dims" not in values:
        raise CheckpointError(f"cannot infer axes_dims for head_dim {head_dim}; pass axes_dims=...")
    return CrossDiTConfig(**values)


def _resolve_folder(path: Path, subfolder: str | None) -> Path:
    if subfolder:
        path = path / subfolder
    elif (path / "model_index.json").exists() and (path / "transformer").is_dir():
        path = path / "transformer"
    return path


def load_crossdit(
    cls: type[CrossDiT],
    path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: CrossDiTConfig | str | dict | None = None,
    subfolder: str | None = None,
    **overrides: Any,
) -> CrossDiT:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist (downloads are never attempted; "
                              f"fetch the weights first and pass a local path)")
    if path.is_dir():
        path = _resolve_folder(path, subfolder)
        if config is None:
            if not (path / CONFIG_NAME).exists():
                raise CheckpointError(f"{path} has no {CONFIG_NAME}; is this a diffusers transformer folder?")
            config = CrossDiTConfig.from_json_file(path / CONFIG_NAME)
    state = read_state_dict(path)
    if config is None:
        config = infer_config(state, **overrides)
    elif isinstance(config, str):
        config = get_preset(config, **overrides)
    elif isinstance(config, dict):
        config = CrossDiTConfig.from_dict({**config, **overrides})
    elif overrides:
        config = config.replace(**overrides)
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint {path} does not match CrossDiT({config.model_dim=}, {config.num_visual_blocks=}): "
            f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"{len(mismatched)} shape mismatches {mismatched[:3]}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    if torch_dtype is not None:
        if torch_dtype == torch.float32:
            model.float()
        else:
            model.to_mixed_precision(torch_dtype)
    if device is not None:
        model.to(device)
    return model


def checkpoint_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """dtype per tensor name without loading data (used to check the fp32-modulation layout)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}


def component_parameter_counts(model_dir: str | os.PathLike) -> dict[str, int]:
    """Parameters per component of a diffusers pipeline folder (``model_index.json`` names them), read from the
    safetensors headers: no weights are loaded."""
    model_dir = Path(model_dir)
    index = json.loads((model_dir / "model_index.json").read_text())
    counts: dict[str, int] = {}
    for name in sorted(k for k in index if not k.startswith("_")):
        total = 0
        for f in sorted((model_dir / name).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    n = 1
                    for dim in st.get_slice(key).get_shape():
                        n *= dim
                    total += n
        counts[name] = total
    return counts


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the kernel, libc or the file
    system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: no exchange here, use the fallback
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(new: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Put the complete folder ``new`` at ``out``, replacing what is there, so that a reader of ``out`` sees the
    previous folder or the new one, never neither (the two are swapped in one step, then the old one is deleted).
    Where an atomic swap is unavailable, ``out`` moves aside to ``.<name>.old`` first and is restored by the next
    call if a crash left it there. ``new`` must be on the same file system as ``out``. Returns ``out``."""
    import shutil

    new, out = Path(new), Path(out)
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.exists():  # a crash between the fallback's two renames: put the last good one back
        old.rename(out)
    if out.exists() and _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the previous folder
        return out
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def assemble_pipeline_folder(base: str | os.PathLike, transformer: str | os.PathLike,
                             out: str | os.PathLike) -> Path:
    """A complete diffusers pipeline folder at ``out``: ``base``'s ``model_index.json``, the trained ``transformer``
    folder copied in, and every other component of ``base`` (text encoders, tokenizers, VAE, scheduler) as a relative
    symbolic link, so stages share the frozen parts instead of copying gigabytes each. Anything that follows links
    (``from_pretrained``, a publish to the object store) sees a self-contained folder.

    Built under a temporary name and swapped into place (``replace_dir``): ``out`` is the previous complete folder
    or the new one, never a partial one. Returns ``out``."""
    import shutil

    base, transformer, out = Path(base).resolve(), Path(transformer), Path(out)
    index_path = base / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"base pipeline {base} has no model_index.json; pass a diffusers pipeline folder")
    if not (transformer / CONFIG_NAME).is_file():
        raise CheckpointError(f"{transformer} is not a transformer folder (no {CONFIG_NAME})")
    index = json.loads(index_path.read_text())
    components = sorted(k for k in index if not k.startswith("_"))
    missing = [c for c in components if c != "transformer" and not (base / c).is_dir()]
    if missing:
        raise CheckpointError(f"base pipeline {base} lacks the component folders {missing}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shutil.copytree(transformer, tmp / "transformer")
        for name in components:
            if name != "transformer":
                (tmp / name).symlink_to(os.path.relpath(base / name, out.parent.resolve() / out.name))
        shutil.copy2(index_path, tmp / "model_index.json")
        tmp.chmod(0o755)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
