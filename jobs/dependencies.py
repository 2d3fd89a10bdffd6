"""Job dependencies in a batch file: `name`, `needs`, and the `from` keys that imply a need.

`resolve_needs` turns the names each expanded job refers to into positions in the batch
(every job a matrix made of a named entry answers to its name) and checks what a parent
must be for a child to build on it. `topological_order` runs parents first.
"""

from __future__ import annotations

import difflib
import heapq
from dataclasses import dataclass, field

from jobs.errors import Problems
from jobs.extensions import EXTENSION_KINDS
from jobs.spec import JOB_REF_RE, JobKind, JobSpec

#: what a `from` key takes from its parent, by section
_ARTIFACT = {"layer": "added layer", "lora": "LoRA adapter"}


@dataclass(frozen=True)
class Node:
    """One expanded job, as the dependency checks see it."""

    label: str
    #: index of the job entry (in the file's `jobs` list) that made it
    entry: int
    #: None when the job is invalid itself (already reported): checks that need it are skipped
    spec: JobSpec | None
    #: section -> the `from` written on the job entry itself or set by its matrix (not inherited from defaults)
    written_from: dict[str, str] = field(default_factory=dict)


def _references(spec: JobSpec) -> list[tuple[str, str]]:
    refs = [("needs", name) for name in spec.needs]
    for section in ("layer", "lora"):
        settings = getattr(spec, section, None)
        if settings is not None and settings.from_ is not None:
            refs.append((f"{section}.from", settings.from_))
    return refs


def _suggest(name: str, names: dict[str, list[int]]) -> str:
    close = difflib.get_close_matches(name, list(names), n=1)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; the named jobs are {', '.join(f'`{n}`' for n in sorted(names)[:10])}" if names else \
        "; no job of this batch has a `name`"


def resolve_needs(nodes: list[Node], names: dict[str, list[int]], problems: Problems) -> list[list[int | str]]:
    """Per job: the sorted positions of the jobs it waits for, then the ids of earlier jobs (`job:ID`).

    `names` maps each job name to the positions of the jobs that carry it. Problems (unknown names,
    a job waiting for itself, a `from` that cannot work, a cycle) go to `problems`, one line each.
    """
    needs: list[list[int | str]] = []
    edges: dict[int, set[int]] = {}  # job entry -> the job entries it waits for
    for node in nodes:
        positions: set[int] = set()
        external: list[str] = []
        for key, ref in _references(node.spec) if node.spec is not None else []:
            match = JOB_REF_RE.fullmatch(ref)
            if match:
                if match.group(1) not in external:
                    external.append(match.group(1))
                continue
            targets = _targets(node, key, ref, nodes, names, problems)
            if targets:
                positions.update(targets)
                edges.setdefault(node.entry, set()).add(nodes[targets[0]].entry)
        if node.spec is not None:
            _check_from(node, nodes, names, problems)
        needs.append([*sorted(positions), *external])
    _check_cycles(edges, {nodes[p[0]].entry: name for name, p in names.items() if p}, problems)
    return needs


def _targets(node: Node, key: str, ref: str, nodes: list[Node], names: dict[str, list[int]],
             problems: Problems) -> list[int]:
    """The positions `ref` names for `node`'s `key`, or [] after recording why it cannot."""
    targets = names.get(ref)
    if targets is None:
        problems.add(node.label, f"key `{key}`: no job is named `{ref}`{_suggest(ref, names)}", node.entry)
        return []
    if nodes[targets[0]].entry == node.entry:
        problems.add(node.label, f"key `{key}`: `{ref}` is this job's own name; a job cannot wait for itself",
                     node.entry)
        return []
    if key != "needs" and len(targets) != 1:
        problems.add(node.label, f"key `{key}`: `{ref}` names {len(targets)} jobs (a matrix); a `from` needs "
                     "exactly one: give the parent you mean a job entry and a name of its own", node.entry)
        return []
    return targets


def _check_from(node: Node, nodes: list[Node], names: dict[str, list[int]], problems: Problems) -> None:
    """What the job's `from` and `freeze` keys need of the job and of its parents."""
    spec = node.spec
    assert spec is not None
    sections = EXTENSION_KINDS[spec.extension].sections

    def problem(message: str) -> None:
        problems.add(node.label, message, node.entry)

    for section, ref in node.written_from.items():
        if section not in sections:
            having = " or ".join(f"`{kind}`" for kind, info in EXTENSION_KINDS.items() if section in info.sections)
            problem(f"key `{section}.from`: a `{spec.extension}` job has no {_ARTIFACT[section]}, so it cannot "
                    f"start from `{ref}`'s; remove `{section}.from` or use extension {having}")
    for key, ref in _references(spec):
        targets = names.get(ref, ())
        parent = nodes[targets[0]].spec if len(targets) == 1 else None
        if key == "needs" or parent is None or nodes[targets[0]].entry == node.entry:
            continue
        section = key.split(".")[0]
        if section not in EXTENSION_KINDS[parent.extension].sections:
            problem(f"key `{key}`: `{ref}` is a `{parent.extension}` job: it trains no {_ARTIFACT[section]}")
        elif section == "lora" and parent.extension != spec.extension:
            problem(f"key `lora.from`: `{ref}` is a `{parent.extension}` job and this one a `{spec.extension}` "
                    "job; an adapter continues on the same extension kind")
        if parent.base_model != spec.base_model:
            problem(f"key `{key}`: `{ref}` is built on {parent.base_model} and this job on {spec.base_model}; "
                    "a `from` parent must have the same base_model")
    _check_freeze_and_hybrid(spec, problem)


def _check_freeze_and_hybrid(spec: JobSpec, problem) -> None:
    layer, lora = spec.layer, spec.lora
    if lora is not None and lora.from_ is not None and layer is not None and layer.from_ != lora.from_:
        problem(f"key `lora.from`: the adapter of `{lora.from_}` was trained on its added block too: "
                f"add `layer.from: {lora.from_}`")
    if layer is not None and layer.freeze:
        if layer.from_ is None:
            problem("key `layer.freeze`: only a block loaded with `layer.from` can be frozen (a new block "
                    "must train); add `layer.from: NAME` or remove `freeze`")
        elif spec.kind == JobKind.TRAIN and EXTENSION_KINDS[spec.extension].sections == ("layer",):
            problem(f"key `layer.freeze`: a `{spec.extension}` job trains only its block, so with it frozen "
                    "nothing would train; use extension `hybrid` (its LoRA trains) or remove `freeze`")


def _check_cycles(edges: dict[int, set[int]], entry_names: dict[int, str], problems: Problems) -> None:
    """Record each cycle of waits among job entries once, as `a -> b -> a` (a waits for b)."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    seen: set[frozenset[int]] = set()
    for start in sorted(edges):
        if state.get(start):
            continue
        path: list[int] = [start]
        pending = [iter(sorted(edges.get(start, ())))]
        state[start] = 1
        while pending:
            following = next(pending[-1], None)
            if following is None:
                state[path.pop()] = 2
                pending.pop()
            elif state.get(following) == 1:
                cycle = path[path.index(following):]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    shown = " -> ".join(entry_names.get(e, f"entry {e}") for e in [*cycle, following])
                    problems.add("batch file", f"key `needs`: the jobs wait for each other in a cycle, "
                                 f"{shown}, so none of them could ever start; remove one of the waits")
            elif not state.get(following):
                state[following] = 1
                path.append(following)
                pending.append(iter(sorted(edges.get(following, ()))))


def topological_order(needs: list[list[int | str]], priorities: list[int] | None = None) -> list[int]:
    """Positions such that every job comes after the jobs of the batch it needs; otherwise the ready
    job of highest `priorities` first, then in batch order. Raises ValueError if the needs form a cycle."""
    rank = priorities or [0] * len(needs)
    waiting = [0] * len(needs)
    dependants: list[list[int]] = [[] for _ in needs]
    for position, need in enumerate(needs):
        for parent in need:
            if isinstance(parent, int):
                waiting[position] += 1
                dependants[parent].append(position)
    ready = [(-rank[position], position) for position, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        _, position = heapq.heappop(ready)
        order.append(position)
        for child in dependants[position]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (-rank[child], child))
    if len(order) != len(needs):
        raise ValueError("the jobs' needs form a cycle")
    return order
