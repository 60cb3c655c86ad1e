"""``spigot guard``: check a guardrail policy, and try one on text.

Needs nothing of the server: ``spigot.guard`` is imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.group("guard")
def guard() -> None:
    """Guardrail policies: check them, and try them on text."""


@guard.command("check")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--import-plugins",
    is_flag=True,
    help="Also import the policy's plug-ins (this runs their code, as serving does).",
)
def guard_check(policy_file: Path, import_plugins: bool) -> None:
    """Check a policy and list its rules; exits 1 with the reason when it is invalid.

    Plug-ins are named, not imported, unless --import-plugins says so: checking a
    file must not run code from it.
    """
    from spigot.guard import PolicyError
    from spigot.guard.policy import rules_from_file

    if import_plugins:
        rules = list(load_policy(policy_file).rules)
    else:
        try:
            rules = rules_from_file(policy_file)
        except PolicyError as exc:
            raise click.ClickException(str(exc)) from None
    for rule in rules:
        click.echo(f"{rule.id}\t{rule.kind}\t{rule.action}\t{','.join(sorted(rule.applies_to))}")
    plugins = sum(rule.kind == "plugin" for rule in rules)
    note = f" ({plugins} plug-in(s) not imported)" if plugins and not import_plugins else ""
    click.echo(f"{policy_file}: {len(rules)} rule(s), valid{note}", err=True)


@guard.command("test")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("text_file", type=click.File("r", encoding="utf-8"), default="-")
@click.option(
    "--direction",
    type=click.Choice(["output", "input"]),
    default="output",
    show_default=True,
    help="Apply the policy's output rules (a reply) or its input rules (a prompt).",
)
@click.option(
    "--split",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Feed the text in deltas of this many characters, as a stream would arrive.",
)
def guard_test(policy_file: Path, text_file: Any, direction: str, split: int) -> None:
    """Run a policy over text (a file, or stdin) and show what it would redact or block.

    The guarded text goes to stdout exactly as a client would receive it; what
    tripped, and the most characters held back at once, go to stderr.
    """
    policy = load_policy(policy_file)
    text = text_file.read()
    rules = policy.output if direction == "output" else policy.input
    guard = rules.guard()
    trips = []
    most_held = 0
    for start in range(0, len(text), split):
        released = guard.feed(text[start : start + split])
        click.echo(released.text, nl=False)
        trips += released.trips
        most_held = max(most_held, released.held)
        if released.blocked is not None:
            break
    else:
        released = guard.finish()
        click.echo(released.text, nl=False)
        trips += released.trips
    click.echo()
    for trip in trips:
        matched = text[trip.start : trip.end]
        click.echo(
            f"{trip.action:>6}  {trip.rule_id}  chars {trip.start}-{trip.end}  {matched!r}",
            err=True,
        )
    if guard.blocked is not None:
        click.echo(f"blocked by {guard.blocked.rule_id} at char {guard.blocked.start}", err=True)
    click.echo(
        f"{len(trips)} trip(s); at most {most_held} character(s) held back at once", err=True
    )


def load_policy(path: Path) -> Any:
    from spigot.guard import Policy, PolicyError

    try:
        return Policy.from_file(path)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None
