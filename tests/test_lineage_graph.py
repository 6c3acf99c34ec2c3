"""The code location is ONE lineage: every asset is connected, and raw media lead to the registered release."""

from __future__ import annotations

import dagster as dg

from k5model.training.stages import CHAINS


def _graph() -> tuple[set[dg.AssetKey], dict[dg.AssetKey, set[dg.AssetKey]]]:
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    keys = set(graph.get_all_asset_keys())
    return keys, {k: set(graph.get(k).parent_keys) for k in keys}


def _ancestors(key: dg.AssetKey, parents: dict[dg.AssetKey, set[dg.AssetKey]]) -> set[dg.AssetKey]:
    seen, todo = set(), [key]
    while todo:
        for p in parents[todo.pop()] - seen:
            seen.add(p)
            todo.append(p)
    return seen


def components(keys: set[dg.AssetKey], parents: dict[dg.AssetKey, set[dg.AssetKey]]) -> list[set[dg.AssetKey]]:
    """Weakly connected components of the asset graph."""
    neighbours = {k: set(parents[k]) for k in keys}
    for k in keys:
        for p in parents[k]:
            neighbours[p].add(k)
    out, left = [], set(keys)
    while left:
        comp, todo = set(), [left.pop()]
        while todo:
            k = todo.pop()
            comp.add(k)
            todo += [n for n in neighbours[k] if n not in comp and n in left]
            left -= neighbours[k]
        out.append(comp)
    return out


def test_one_connected_lineage_from_raw_sources_to_release() -> None:
    keys, parents = _graph()
    comps = components(keys, parents)
    assert len(comps) == 1, f"islands: {[sorted(k.to_user_string() for k in c) for c in comps]}"
    release = _ancestors(dg.AssetKey("release"), parents)
    path = ["raw_sources", "scored_scenes", "curated_dataset", "latent_shards", "sbs_batch", "sbs_report"]
    assert {dg.AssetKey(k) for k in path} <= release
    for chain, stages in CHAINS.items():
        for stage in stages:
            up = _ancestors(dg.AssetKey(f"train_{stage}"), parents)
            latents = "image_latent_shards" if chain == "image_lite" else "latent_shards"
            assert dg.AssetKey(latents) in up and dg.AssetKey("raw_sources") in up, stage
            if stage.startswith("image_edit"):  # issue 15: the editing stages train on the mined pairs
                mined = ("curated_dataset", "edit_candidates", "edit_pairs", "edit_latent_shards")
                assert {dg.AssetKey(k) for k in mined} <= up, stage
        assert dg.AssetKey(f"train_{stages[-1]}") in release, chain


def test_island_detection_decides_both_ways() -> None:
    a, b, c = dg.AssetKey("a"), dg.AssetKey("b"), dg.AssetKey("c")
    assert len(components({a, b, c}, {a: set(), b: {a}, c: {b}})) == 1
    assert len(components({a, b, c}, {a: set(), b: {a}, c: set()})) == 2
