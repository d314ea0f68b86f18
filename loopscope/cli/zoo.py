"""``loopscope zoo``: list the shipped models, (re)build one from its recipe."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from loopscope.cli.app import prepare_out, zoo_app
from loopscope.core.errors import LoopscopeError, suggest


@zoo_app.callback()
def zoo_list(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="print the table as JSON"),
) -> None:
    """List every zoo model with its ID/OOD accuracy.

    Example: loopscope zoo --json
    """
    if ctx.invoked_subcommand is not None:
        return
    from loopscope import zoo

    df = zoo.table()
    if as_json:
        typer.echo(df.to_json(orient="records", indent=1))
        return
    if df.empty:
        typer.echo("no zoo models shipped")
        return
    from rich.table import Table

    t = Table(title="loopscope zoo")
    for c in df.columns:
        t.add_column(str(c))
    for _, row in df.iterrows():
        t.add_row(*[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.tolist()])
    Console().print(t)


@zoo_app.command("build")
def zoo_build(
    name: str = typer.Argument(..., help="recipe name (see `loopscope zoo recipes`)"),
    steps: int = typer.Option(None, help="override the recipe's step budget"),
    out: Path = typer.Option(None, help="write here instead of the package's zoo folder"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """(Re)train a zoo model from its recipe and write checkpoint + measured card.

    Example: loopscope zoo build s3_fprm
    """
    from loopscope.zoo import recipes

    if name not in recipes.RECIPES:
        raise LoopscopeError(
            f"unknown recipe {name!r}{suggest(name, recipes.RECIPES)}; recipes: "
            f"{', '.join(recipes.RECIPES)}"
        )
    if steps is not None and steps < 1:
        raise LoopscopeError(f"--steps must be a positive integer, got {steps}")
    if out is not None:
        with prepare_out(out):
            card = recipes.build(name, steps=steps, out=out, progress=not quiet)
    else:
        card = recipes.build(name, steps=steps, out=out, progress=not quiet)
    typer.echo(json.dumps(card.get("accuracy", {}), indent=1))


@zoo_app.command("recipes")
def zoo_recipes() -> None:
    """List the recipes that `loopscope zoo build` knows."""
    from loopscope.zoo.recipes import RECIPES

    for n, r in RECIPES.items():
        typer.echo(f"{n}: task={r.train.task} preset={r.train.preset} steps={r.train.steps}")
