"""The workloads of ``spigot bench``: which prompts the requests carry.

* ``mixed``: the prompt set shipped in ``prompts/mixed.json``, one-line
  questions to multi-paragraph tasks;
* ``long``: synthetic reports of about 1,000 to 2,000 tokens, each followed by
  a task, so prefill dominates;
* ``shared-prefix``: one ~1,000-token system prompt (a shop's catalogue and
  policies) shared by every request, plus short varied questions, so a server
  that reuses a cached prefix shows it.

The synthetic text comes from a fixed seed, so every run and every server
sees the same prompts; ``--seed`` only changes the order they are sent in.
Token counts are estimates (about 4.8 characters per token for this plain prose in
the usual BPE vocabularies); the server's usage reports the real ones.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

WORKLOADS = ("mixed", "long", "shared-prefix")
_GENERATOR_SEED = 20261125
_CHARS_PER_TOKEN = 4.8


@dataclass(frozen=True)
class Prompt:
    id: str
    user: str
    system: str | None = None

    def as_text(self) -> str:
        """The prompt for the completions endpoint, which has no roles."""
        return f"{self.system}\n\n{self.user}\n" if self.system else f"{self.user}\n"


def load_workload(name: str) -> list[Prompt]:
    if name == "mixed":
        text = resources.files("spigot.bench").joinpath("prompts/mixed.json").read_text("utf-8")
        return parse_prompt_set(json.loads(text))
    if name == "long":
        return long_prompts()
    if name == "shared-prefix":
        return shared_prefix_prompts()
    raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")


def load_prompt_file(path: Path) -> list[Prompt]:
    """A prompt set in the shape of ``prompts/mixed.json`` (or a bare list of entries)."""
    return parse_prompt_set(json.loads(path.read_text("utf-8")))


def parse_prompt_set(data: Any) -> list[Prompt]:
    entries = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ValueError("a prompt set is a non-empty list of {id, prompt[, system]}")
    prompts = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            prompts.append(Prompt(str(i), entry))
        elif isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            system = entry.get("system")
            prompts.append(
                Prompt(str(entry.get("id", i)), entry["prompt"], system if system else None)
            )
        else:
            raise ValueError(f"prompt {i}: expected a string or an object with 'prompt'")
    return prompts


def tagged(prompt: Prompt, tag: str) -> Prompt:
    """The prompt with ``tag`` opening its first message (the system one if any)."""
    if prompt.system:
        return replace(prompt, system=f"{tag} {prompt.system}")
    return replace(prompt, user=f"{tag} {prompt.user}")


def estimate_tokens(text: str) -> int:
    return round(len(text) / _CHARS_PER_TOKEN)


# -- long ----------------------------------------------------------------------

_UNITS = [
    "The northern warehouse", "Our support team", "The billing service", "The Lyon office",
    "The mobile app team", "The night shift", "The procurement group", "The data platform",
    "The customer success team", "The delivery fleet", "The training programme",
    "The quality lab", "The new onboarding flow", "The partner network", "The finance desk",
]  # fmt: skip
_VERBS = [
    "reported", "reduced", "increased", "reviewed", "stabilised", "doubled", "measured",
    "questioned", "improved", "cut", "tracked", "reorganised", "audited", "outsourced",
]  # fmt: skip
_OBJECTS = [
    "its average response time", "the number of open tickets", "shipping costs",
    "the error rate of nightly jobs", "the time spent in meetings", "overtime hours",
    "the share of orders delivered late", "energy use per square metre", "staff turnover",
    "the backlog of unpaid invoices", "customer satisfaction scores", "spare part stock",
    "the cost of cloud storage", "the number of manual approvals",
]  # fmt: skip
_CIRCUMSTANCES = [
    "during the second quarter", "after the new schedule was introduced",
    "despite two unplanned outages", "once the old contracts expired", "in the busiest weeks",
    "compared with the same period last year", "while hiring was frozen",
    "after a supplier changed its terms", "thanks to better forecasting",
    "although the budget stayed flat", "since the move to the new building",
]  # fmt: skip
_COMMENTS = [
    "Managers expect the trend to continue into next year.",
    "Several staff members said the change was overdue.",
    "The figures are still being checked by the controlling team.",
    "A follow-up review is planned for the autumn.",
    "Customers have not yet noticed a difference.",
    "The result was better than the target set in January.",
    "Part of the effect may be seasonal.",
    "The team asked for more time before drawing conclusions.",
]  # fmt: skip
_TASKS = [
    "Summarize the report above in five sentences.",
    "List the three most important findings of the report and explain why they matter.",
    "Which units improved and which got worse? Answer as two short lists.",
    "Write a short memo to the board that explains the main risks in this report.",
    "What questions should management ask before the next review? Give five.",
    "Rewrite the first section of the report as a plain-language update for all staff.",
]


def _report(rng: random.Random, title: str, target_tokens: int) -> str:
    sections: list[str] = [title, ""]
    section = 1
    while estimate_tokens("\n".join(sections)) < target_tokens:
        sentences = []
        for _ in range(rng.randint(4, 7)):
            number = rng.randint(3, 48)
            sentences.append(
                f"{rng.choice(_UNITS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                f"by {number} percent {rng.choice(_CIRCUMSTANCES)}."
            )
            if rng.random() < 0.35:
                sentences.append(rng.choice(_COMMENTS))
        sections.append(f"Section {section}. " + " ".join(sentences))
        sections.append("")
        section += 1
    return "\n".join(sections).rstrip()


def long_prompts(count: int = 16, low: int = 1000, high: int = 2000) -> list[Prompt]:
    """``count`` reports of ``low`` to ``high`` estimated tokens, spread evenly."""
    rng = random.Random(_GENERATOR_SEED)
    prompts = []
    for i in range(count):
        target = low + (high - low) * i // max(count - 1, 1) - 40  # room for the task
        report = _report(rng, f"Operations report {i + 1}", target)
        task = _TASKS[i % len(_TASKS)]
        prompts.append(Prompt(f"long-{i + 1}", f"{report}\n\n{task}"))
    return prompts


# -- shared-prefix -------------------------------------------------------------

_ADJECTIVES = [
    "Summit", "Harbor", "Ridge", "Alder", "Coastal", "Granite", "Meadow", "Cedar", "Polar",
    "Drift", "Canyon", "Falcon", "Tundra", "Willow",
]  # fmt: skip
_KINDS = [
    ("tent", "camping"), ("sleeping bag", "camping"), ("backpack", "hiking"),
    ("rain jacket", "clothing"), ("stove", "cooking"), ("headlamp", "lighting"),
    ("water filter", "hiking"), ("trekking poles", "hiking"), ("down vest", "clothing"),
    ("camp chair", "camping"), ("cook set", "cooking"), ("lantern", "lighting"),
]  # fmt: skip
_COLOURS = ["red", "slate grey", "forest green", "navy", "orange", "sand", "black", "teal"]
_USES = [
    "weekend trips", "alpine tours", "family camping", "long-distance hikes", "cycle touring",
    "winter camping", "festival weekends", "day hikes",
]  # fmt: skip
_POLICIES = """Policies:
- Returns: unused items can be returned within 60 days with the receipt; used items within 30 days if they are faulty.
- Shipping: orders over 80 euros ship free within the country; other orders cost 6.90 euros. Express delivery costs 14 euros and arrives the next working day if ordered before 2 pm.
- Repairs: the workshop repairs tents, jackets and backpacks from any brand. A repair estimate is free; most repairs take ten working days.
- Rentals: tents, stoves and sleeping bags can be rented for 15 percent of the price per week, with a deposit of half the price.
- Opening hours: Monday to Friday 9 am to 7 pm, Saturday 9 am to 5 pm, closed on Sundays and public holidays.
- Loyalty: members collect one point per euro; 200 points give a 10 euro voucher. Points expire after two years."""  # noqa: E501


def _catalogue(rng: random.Random, count: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    names: set[str] = set()
    while len(items) < count:
        kind, category = rng.choice(_KINDS)
        name = f"{rng.choice(_ADJECTIVES)} {kind}"
        if name in names:
            continue
        names.add(name)
        items.append(
            {
                "name": name,
                "category": category,
                "price": rng.randint(12, 420) + 0.95,
                "grams": rng.randrange(90, 4200, 10),
                "warranty": rng.choice([1, 2, 2, 3, 5]),
                "colours": rng.sample(_COLOURS, rng.randint(1, 3)),
                "use": rng.choice(_USES),
            }
        )
    return items


def _system_prompt(items: list[dict[str, Any]]) -> str:
    lines = [
        "You are the shop assistant of Harbor & Pine Outfitters, an outdoor equipment shop. "
        "Answer customers' questions briefly and only from the catalogue and policies below. "
        "If something is not listed, say so and suggest asking in the shop.",
        "",
        "Catalogue:",
    ]
    for item in items:
        lines.append(
            f"- {item['name']} ({item['category']}): {item['price']:.2f} euros, "
            f"{item['grams']} g, {item['warranty']}-year warranty, "
            f"colours {', '.join(item['colours'])}; good for {item['use']}."
        )
    return "\n".join([*lines, "", _POLICIES])


def shared_prefix_prompts(count: int = 32, items: int = 18) -> list[Prompt]:
    """``count`` short questions behind one shared ~1,000-token system prompt."""
    rng = random.Random(_GENERATOR_SEED + 1)
    catalogue = _catalogue(rng, items)
    system = _system_prompt(catalogue)
    templates = [
        "How much does the {a} cost?",
        "What colours does the {a} come in?",
        "Which is lighter, the {a} or the {b}?",
        "How long is the warranty on the {a}?",
        "I am planning {use}. Is the {a} a good choice?",
        "Can I rent the {a}, and what would a week cost?",
        "If I buy the {a} and the {b}, do I get free shipping?",
        "Can I return the {a} after using it once?",
        "Do you have anything for {use} under 100 euros?",
        "Is the shop open on Sunday, and can the workshop repair my {a}?",
    ]
    prompts = []
    for i in range(count):
        a, b = rng.sample(catalogue, 2)
        question = templates[i % len(templates)].format(
            a=a["name"], b=b["name"], use=rng.choice(_USES)
        )
        prompts.append(Prompt(f"shared-{i + 1}", question, system))
    return prompts
