"""Model soups (k5model.soup): weights per scheme, the hierarchical flattening, exact weighted means of real tiny
CrossDiT folders, mismatch errors naming the key, the recorded recipe, the ``k5 soup`` CLI, and peak memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from k5model.checkpoint import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, read_state_dict, save_transformer_folder
from k5model.config import get_preset
from k5model.crossdit import CrossDiT
from k5model.soup import (
    SoupError,
    SoupIngredient,
    SoupRecipe,
    infer_weights_kind,
    merge_streamed,
    read_soup_metadata,
    soup,
    soup_weights,
)
from k5model.synthetic import randomize


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_file_names_match_checkpoint_module():
    import k5model.checkpoint as ck
    import k5model.soup as sp

    assert (sp.WEIGHTS_NAME, sp.INDEX_NAME, sp.CONFIG_NAME) == (ck.WEIGHTS_NAME, ck.INDEX_NAME, ck.CONFIG_NAME)


# ---------------------------------------------------------------- weights


def test_soup_weights_per_scheme_match_hand_values():
    sizes = [1, 4, 9, 16]
    assert soup_weights(sizes, "equal") == [0.25, 0.25, 0.25, 0.25]
    assert soup_weights(sizes, "size") == pytest.approx([1 / 30, 4 / 30, 9 / 30, 16 / 30], rel=1e-15)
    assert soup_weights(sizes, "sqrt_size") == pytest.approx([0.1, 0.2, 0.3, 0.4], rel=1e-15)
    assert soup_weights([3, 1], "size") == [0.75, 0.25]  # exactly representable
    assert soup_weights([9, 1], "sqrt_size") == [0.75, 0.25]


@pytest.mark.parametrize("sizes, scheme, match", [
    ([1, 2], "median", "unknown soup scheme 'median'"),
    ([], "equal", "at least one"),
    ([4, 0], "size", r"positive numbers, got \[0\]"),
    ([4, float("nan")], "sqrt_size", "positive numbers"),
])
def test_soup_weights_reject_bad_input(sizes, scheme, match):
    with pytest.raises(SoupError, match=match):
        soup_weights(sizes, scheme)


def _ing(path: str, domain: str, size: int, sub: str | None = None, kind: str = "ema") -> SoupIngredient:
    return SoupIngredient(path=path, domain=domain, subdomain=sub, size=size, weights_kind=kind)


# people: subdomains of 1 and 9 items (sqrt -> 1/4, 3/4); nature: 4 and 4 (1/2, 1/2); food: one model of 16.
HIER = [_ing("p1", "people", 1, "portrait"), _ing("p2", "people", 9, "crowd"), _ing("n1", "nature", 4, "sea"),
        _ing("n2", "nature", 4, "forest"), _ing("f1", "food", 16)]


@pytest.mark.parametrize("top, domain_weights", [
    ("equal", [1 / 3, 1 / 3, 1 / 3]),
    ("size", [10 / 34, 8 / 34, 16 / 34]),  # domain size = sum of its subdomains' sizes
    ("sqrt_size", [math.sqrt(10) / (math.sqrt(10) + math.sqrt(8) + 4),
                   math.sqrt(8) / (math.sqrt(10) + math.sqrt(8) + 4), 4 / (math.sqrt(10) + math.sqrt(8) + 4)]),
])
def test_hierarchical_recipe_flattens_to_domain_times_subdomain_weight(top, domain_weights):
    recipe = SoupRecipe.image(HIER, domain_scheme=top)
    people, nature, food = domain_weights
    expected = [people / 4, people * 3 / 4, nature / 2, nature / 2, food]
    assert recipe.leaf_weights() == pytest.approx(expected, rel=1e-14)
    assert sum(recipe.leaf_weights()) == pytest.approx(1.0, abs=1e-15)


def test_flat_and_video_recipes():
    video = SoupRecipe.video([_ing(f"d{i}", f"domain{i}", 10 * (i + 1)) for i in range(9)])
    assert video.leaf_weights() == [1 / 9] * 9  # uniform whatever the sizes
    flat = SoupRecipe(ingredients=HIER, scheme="size")  # not hierarchical: one level over the 5 models
    assert flat.leaf_weights() == pytest.approx([1 / 34, 9 / 34, 4 / 34, 4 / 34, 16 / 34], rel=1e-15)


def test_recipe_validation_decides_both_ways(tmp_path):
    SoupRecipe.image(HIER)  # valid
    with pytest.raises(SoupError, match="domain 'nature'.*own subdomain name"):
        SoupRecipe.image([*HIER[:2], _ing("n1", "nature", 4, "sea"), _ing("n2", "nature", 4, "sea")])
    SoupRecipe(ingredients=[*HIER[:2], _ing("n1", "nature", 4), _ing("n2", "nature", 4)])  # flat: no subdomains needed
    with pytest.raises(SoupError, match="listed twice"):
        SoupRecipe.video([_ing("a", "x", 1), _ing("a", "y", 1)])
    with pytest.raises(SoupError, match="weights_kind must be one of"):
        _ing("a", "x", 1, kind="best")
    with pytest.raises(SoupError, match="size must be a positive integer"):
        _ing("a", "x", 0)
    with pytest.raises(SoupError, match=r"unknown soup recipe fields \['schema'\]"):
        SoupRecipe.from_dict({"ingredients": [], "schema": "equal"})


def test_recipe_json_round_trip_and_weights_kind_inference():
    recipe = SoupRecipe.image(HIER, domain_scheme="sqrt_size")
    again = SoupRecipe.from_json(recipe.to_json())
    assert again == recipe and again.leaf_weights() == recipe.leaf_weights()
    assert infer_weights_kind("/runs/sft_people/ema/transformer") == "ema"
    assert infer_weights_kind("/runs/sft_people/raw/transformer") == "raw"
    assert infer_weights_kind("/runs/sft_people/pipeline") is None


# ---------------------------------------------------------------- merging real tiny CrossDiT folders


def _member(root: Path, seed: int, *, dtype: torch.dtype | None = None, shard: int | None = None) -> Path:
    model = randomize(CrossDiT(get_preset("tiny")), std=0.05, seed=seed)
    if dtype is not None:
        model.to_mixed_precision(dtype)
    folder = root / f"m{seed}" / "ema" / "transformer"
    kwargs = {"max_shard_size": shard} if shard else {}
    return save_transformer_folder(model, folder, **kwargs)


def _hand_mean(folders: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * x_i in fp32, member order, from zero; cast to the members' dtype."""
    states = [read_state_dict(f) for f in folders]
    out = {}
    for key, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float32)
        for state, w in zip(states, weights):
            acc = acc + state[key].to(torch.float32) * w
        out[key] = acc.to(ref.dtype)
    return out


@pytest.fixture(scope="module")
def fp32_members(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("soup_members")
    # the second member is sharded (index json), the others single files
    return [_member(root, s, shard=20_000 if s == 1 else None) for s in range(5)]


@pytest.mark.parametrize("recipe_kind", ["equal", "size", "sqrt_size", "image_equal", "image_size", "video"])
def test_soup_equals_weighted_mean_of_members_exactly(fp32_members, tmp_path, recipe_kind):
    ings = [_ing(str(p), h.domain, h.size, h.subdomain) for p, h in zip(fp32_members, HIER)]
    if recipe_kind.startswith("image_"):
        recipe = SoupRecipe.image(ings, domain_scheme=recipe_kind.removeprefix("image_"))
    elif recipe_kind == "video":
        recipe = SoupRecipe.video(ings)
    else:
        recipe = SoupRecipe(ingredients=ings, scheme=recipe_kind)
    weights = recipe.leaf_weights()
    # chunk of 100 elements: large tensors are split by rows, small ones batched across tensors
    out = soup(recipe, tmp_path / "soup", chunk_numel=100, progress=False)
    merged = read_state_dict(out)
    expected = _hand_mean(fp32_members, weights)
    assert merged.keys() == expected.keys()
    for key in expected:
        assert merged[key].dtype == expected[key].dtype
        assert torch.equal(merged[key], expected[key]), key
    meta = read_soup_metadata(out)
    assert meta["recipe"] == recipe.to_dict()
    assert [m["weight"] for m in meta["members"]] == weights
    assert {i["weights_kind"] for i in meta["recipe"]["ingredients"]} == {"ema"}


def test_hand_weights_give_the_same_soup(fp32_members, tmp_path):
    """The weights the hierarchical recipe uses are the hand-derived ones (exactly representable here)."""
    ings = [_ing(str(p), h.domain, h.size, h.subdomain) for p, h in zip(fp32_members[:4], HIER[:4])]
    recipe = SoupRecipe.image(ings)  # people 1/2 x (1/4, 3/4), nature 1/2 x (1/2, 1/2)
    hand = [1 / 8, 3 / 8, 1 / 4, 1 / 4]
    assert recipe.leaf_weights() == hand
    merged = read_state_dict(soup(recipe, tmp_path / "soup", progress=False))
    expected = _hand_mean(fp32_members[:4], hand)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


def test_bf16_members_chunking_does_not_change_the_soup_and_it_loads(tmp_path):
    members = [_member(tmp_path, s, dtype=torch.bfloat16) for s in range(3)]
    weights = soup_weights([1, 4, 9], "sqrt_size")
    whole = merge_streamed(members, weights, tmp_path / "whole", progress=False)
    rows = merge_streamed(members, weights, tmp_path / "rows", chunk_numel=7, max_shard_size=30_000,
                          progress=False)
    assert (rows / INDEX_NAME).is_file() and not (whole / INDEX_NAME).exists()
    a, b, expected = read_state_dict(whole), read_state_dict(rows), _hand_mean(members, weights)
    for key in expected:
        assert torch.equal(a[key], expected[key]) and torch.equal(b[key], expected[key]), key
    # mixed precision kept: modulations fp32, the rest bf16
    assert a["visual_transformer_blocks.0.visual_modulation.out_layer.weight"].dtype == torch.float32
    assert a["visual_transformer_blocks.0.feed_forward.in_layer.weight"].dtype == torch.bfloat16
    model = CrossDiT.from_pretrained(rows)
    assert model.config == CrossDiT.from_pretrained(members[0]).config
    assert (rows / CONFIG_NAME).read_text() == (members[0] / CONFIG_NAME).read_text()


def test_soup_of_pipeline_folders_and_rerun_replaces_output(tmp_path, tiny_t2v_dir):
    member = _member(tmp_path, 7)
    out = merge_streamed([tiny_t2v_dir, member], [0.5, 0.5], tmp_path / "soup", progress=False)
    first = (out / WEIGHTS_NAME).read_bytes()
    expected = _hand_mean([tiny_t2v_dir / "transformer", member], [0.5, 0.5])
    merged = read_state_dict(out)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    (out / "stale.txt").write_text("from an earlier run")
    merge_streamed([tiny_t2v_dir, member], [0.5, 0.5], tmp_path / "soup", progress=False)
    assert (out / WEIGHTS_NAME).read_bytes() == first and not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup.tmp")]


# ---------------------------------------------------------------- mismatches


def _rewrite(folder: Path, change) -> Path:
    state = read_state_dict(folder)
    change(state)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("change, match", [
    (lambda s: s.__setitem__("out_layer.out_layer.bias", torch.zeros(3)),
     r"tensor out_layer.out_layer.bias: soup member .*m2.* has shape \[3\] F32, the first member .* has \[64\] F32"),
    (lambda s: s.__setitem__("out_layer.out_layer.bias", s["out_layer.out_layer.bias"].half()),
     r"tensor out_layer.out_layer.bias: soup member .*m2.* F16.* F32"),
    (lambda s: s.pop("text_embeddings.in_layer.weight"),
     r"tensor text_embeddings.in_layer.weight of .*m0.* is missing from soup member .*m2"),
    (lambda s: s.__setitem__("extra.weight", torch.zeros(2)),
     r"tensor extra.weight of soup member .*m2.* is not in the first member"),
])
def test_mismatched_member_raises_naming_key_and_member(tmp_path, change, match):
    members = [_member(tmp_path, s) for s in range(3)]
    merge_streamed(members, [1 / 3] * 3, tmp_path / "ok", progress=False)  # unchanged members merge
    _rewrite(members[2], change)
    with pytest.raises(SoupError, match=match):
        merge_streamed(members, [1 / 3] * 3, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_config_and_weight_errors(tmp_path):
    members = [_member(tmp_path, s) for s in range(2)]
    cfg = json.loads((members[1] / CONFIG_NAME).read_text())
    (members[1] / CONFIG_NAME).write_text(json.dumps({**cfg, "attention_type": "nabla"}))
    with pytest.raises(SoupError, match=r"config field attention_type of soup member .*m1.* is 'nabla'"):
        merge_streamed(members, [0.5, 0.5], tmp_path / "bad", progress=False)
    (members[1] / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(SoupError, match="sum to 1"):
        merge_streamed(members, [0.5, 0.6], tmp_path / "bad", progress=False)
    with pytest.raises(SoupError, match="2 soup members but 1 weights"):
        merge_streamed(members, [1.0], tmp_path / "bad", progress=False)
    with pytest.raises(SoupError, match="not a transformer folder"):
        merge_streamed([members[0], tmp_path], [0.5, 0.5], tmp_path / "bad", progress=False)
    with pytest.raises(SoupError, match=r"overlaps its member .*m1"):
        merge_streamed(members, [0.5, 0.5], members[1].parent, progress=False)
    assert (members[1] / WEIGHTS_NAME).is_file()


# ---------------------------------------------------------------- CLI


def test_k5_soup_cli_members_recipe_and_errors(tmp_path):
    from k5cli.main import main

    members = [_member(tmp_path, s) for s in range(3)]
    specs = [f"people/a:1:{members[0]}", f"people/b:9:{members[1]}", f"nature:16:{members[2]}"]
    runner = CliRunner()
    res = runner.invoke(main, ["soup", str(tmp_path / "cli"), *sum((["--member", s] for s in specs), []),
                               "--hierarchical", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "0.125000  people/a" in res.output and "0.375000  people/b" in res.output
    assert "0.500000  nature" in res.output and "ema" in res.output
    expected = _hand_mean(members, [1 / 8, 3 / 8, 1 / 2])
    merged = read_state_dict(tmp_path / "cli")
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    # the recorded recipe drives the same soup from a file; an option overrides the file's field
    recipe = read_soup_metadata(tmp_path / "cli")["recipe"]
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    res = runner.invoke(main, ["soup", str(tmp_path / "x"), "--recipe", str(tmp_path / "recipe.json"),
                               "--no-hierarchical", "--scheme", "size", "--dry-run"])
    assert res.exit_code == 0 and "flat: size" in res.output and "0.615385  nature" in res.output, res.output
    assert not (tmp_path / "x").exists()
    plain = tmp_path / "plain"
    save_transformer_folder(randomize(CrossDiT(get_preset("tiny")), seed=9), plain)
    res = runner.invoke(main, ["soup", str(tmp_path / "y"), "--member", f"a:1:{members[0]}",
                               "--member", f"b:1:{plain}"])
    assert res.exit_code == 2 and "cannot tell whether" in res.output and "--weights-kind" in res.output
    res = runner.invoke(main, ["soup", str(tmp_path / "y"), "--member", f"a:1:{members[0]}",
                               "--member", f"b:1:{plain}", "--weights-kind", "raw", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert [i["weights_kind"] for i in read_soup_metadata(tmp_path / "y")["recipe"]["ingredients"]] == ["ema", "raw"]
    _rewrite(plain, lambda s: s.pop("out_layer.out_layer.bias"))
    res = runner.invoke(main, ["soup", str(tmp_path / "z"), "--member", f"a:1:{members[0]}",
                               "--member", f"b:1:{plain}", "--weights-kind", "raw"])
    assert res.exit_code == 2 and "tensor out_layer.out_layer.bias" in res.output


# ---------------------------------------------------------------- memory


def test_nine_member_soup_peaks_below_three_largest_tensors(tmp_path):
    """9 members shaped like video_pro's visual block 0 + non-block tensors, every dimension / 4 (largest: the
    9216 x 256 fp32 modulation, 9 MiB), merge chunk / 16 like the element counts.

    Measured: the resident-set high-water mark of this process during the merge (VmHWM reset through
    /proc/self/clear_refs), minus the resident set before it. That counts torch's CPU tensors (which tracemalloc
    cannot see), the Python heap and the members' memory-mapped pages. tracemalloc's peak is checked as well (it
    only sees Python objects). A control, the naive soup that reads every member whole (``_hand_mean``), must show up
    as >= 9 members in the same measure, so a measurement blind to tensor memory would fail this test."""
    from bench.soup_memory import largest, measure_peak, video_pro_specs, write_members
    from k5model.soup import DEFAULT_CHUNK_NUMEL

    specs = video_pro_specs(blocks=1, scale=4)
    _, big = largest(specs)
    assert big == 9216 * 256 * 4
    members = write_members(tmp_path, specs, 9, shard_bytes=16 * 2**20)
    weights = soup_weights([1] * 9, "equal")
    peak = measure_peak(lambda: merge_streamed(members, weights, tmp_path / "soup",
                                               chunk_numel=DEFAULT_CHUNK_NUMEL // 16, progress=False))
    assert peak["rss_peak_delta_bytes"] < 3 * big, peak
    assert peak["tracemalloc_peak_bytes"] < 3 * big, peak

    member_bytes = sum(math.prod(s) * d.itemsize for s, d in specs.values())
    control = measure_peak(lambda: _hand_mean(members, weights))
    assert control["rss_peak_delta_bytes"] > 0.9 * 9 * member_bytes, control
    with safe_open(str(tmp_path / "soup" / WEIGHTS_NAME), framework="pt") as f:
        assert len(list(f.keys())) == len(specs)
