"""``k5 soup``: a streamed model soup of fine-tuned transformers (report §6.4), built from ``SoupRecipe``: the recipe
comes from a JSON file or from ``--member`` specs, and the recipe-level options are generated from its fields."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from k5model.soup import (
    DEFAULT_CHUNK_NUMEL,
    DEFAULT_MAX_SHARD_SIZE,
    SCHEMES,
    WEIGHTS_KINDS,
    SoupError,
    SoupIngredient,
    SoupRecipe,
    infer_weights_kind,
)
from k5model.training.job import field_docs

MEMBER_HELP = ("A soup ingredient, repeatable: DOMAIN[/SUBDOMAIN]:SIZE:PATH (SIZE = training items of the "
               "(sub)domain, PATH = its transformer or pipeline folder).")


def recipe_options(command: Any) -> Any:
    """One option per ``SoupRecipe`` field except ``ingredients`` (``--member``/``--recipe``), help from its docstring.
    Defaults are None so that a value given on the command line overrides a ``--recipe`` file and nothing else does."""
    docs = field_docs(SoupRecipe)
    for f in reversed(dataclasses.fields(SoupRecipe)):
        if f.name == "ingredients":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{docs[f.name]} [default: {f.default}]"
        if f.type == "bool":
            command = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)(command)
        else:
            command = click.option(flag, f.name, type=click.Choice(SCHEMES), default=None, help=help_text)(command)
    return command


def parse_member(spec: str, weights_kind: str | None) -> SoupIngredient:
    """``DOMAIN[/SUBDOMAIN]:SIZE:PATH`` -> ingredient; the weights kind from the path (``.../ema/...``) or
    ``weights_kind``."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[2]:
        raise SoupError(f"--member {spec!r}: expected DOMAIN[/SUBDOMAIN]:SIZE:PATH")
    domain, _, subdomain = parts[0].partition("/")
    try:
        size = int(parts[1])
    except ValueError:
        raise SoupError(f"--member {spec!r}: SIZE {parts[1]!r} is not an integer") from None
    kind = infer_weights_kind(parts[2]) or weights_kind
    if kind is None:
        raise SoupError(f"--member {spec!r}: cannot tell whether {parts[2]} holds EMA or raw weights; "
                        f"pass --weights-kind ema|raw")
    return SoupIngredient(path=parts[2], domain=domain, subdomain=subdomain or None, size=size, weights_kind=kind)


@click.command("soup")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--recipe", "recipe_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="SoupRecipe as JSON (the 'recipe' a soup records in its metadata has this form).")
@click.option("--member", "members", multiple=True, help=MEMBER_HELP)
@recipe_options
@click.option("--weights-kind", type=click.Choice(WEIGHTS_KINDS), default=None,
              help="EMA or raw weights, for --member paths that do not say it (no 'ema'/'raw' folder in the path).")
@click.option("--chunk-numel", type=click.IntRange(min=1), default=DEFAULT_CHUNK_NUMEL, show_default=True,
              help="Elements averaged at a time (peak memory is about 16 bytes x this).")
@click.option("--max-shard-gib", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_MAX_SHARD_SIZE / 2**30, show_default=True, help="Output shard size limit.")
@click.option("--dry-run", is_flag=True, help="Print the weights and write nothing.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def soup(out: Path, recipe_file: Path | None, members: tuple[str, ...], weights_kind: str | None,
         chunk_numel: int, max_shard_gib: float, dry_run: bool, no_progress: bool, **recipe_fields: Any) -> None:
    """Average fine-tuned transformers into the transformer folder OUT, tensor chunk by chunk (never N models in
    memory); the recipe and weights go into OUT's safetensors metadata."""
    from k5cli.main import K5Error

    changes = {k: v for k, v in recipe_fields.items() if v is not None}
    try:
        if recipe_file is not None:
            if members:
                raise SoupError("give --recipe or --member, not both")
            data = json.loads(recipe_file.read_text())
            recipe = SoupRecipe.from_dict({**data, **changes})
        elif members:
            recipe = SoupRecipe(ingredients=[parse_member(m, weights_kind) for m in members], **changes)
        else:
            raise SoupError("no ingredients: pass --recipe FILE or --member specs")
        weights = recipe.leaf_weights()
    except (SoupError, json.JSONDecodeError, TypeError) as err:
        raise K5Error(str(err)) from None
    mode = (f"hierarchical: {recipe.subdomain_scheme} inside a domain, {recipe.scheme} over domains"
            if recipe.hierarchical else f"flat: {recipe.scheme}")
    click.echo(f"soup of {len(weights)} ingredients ({mode})")
    for ing, w in zip(recipe.ingredients, weights):
        name = ing.domain + (f"/{ing.subdomain}" if ing.subdomain else "")
        click.echo(f"  {w:.6f}  {name:<24} size {ing.size:<8} {ing.weights_kind:<3}  {ing.path}")
    if dry_run:
        return
    from k5model.soup import soup as make_soup

    try:
        path = make_soup(recipe, out, chunk_numel=chunk_numel, max_shard_size=int(max_shard_gib * 2**30),
                         progress=not no_progress)
    except (SoupError, OSError) as err:
        raise K5Error(str(err)) from None
    click.echo(f"wrote {path}")
