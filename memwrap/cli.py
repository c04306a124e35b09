"""The `memwrap` command line."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="memwrap")
def main() -> None:
    """memwrap: full-parameter training in a fraction of the memory."""


@main.command()
@click.option("--steps", default=40, show_default=True, type=click.IntRange(min=1), help="training steps per run")
def demo(steps: int) -> None:
    """Train a small Llama-shaped model on Shakespeare with and without memwrap; print loss and memory."""
    from .demo import run_demo

    run_demo(steps=steps)


if __name__ == "__main__":
    main()
