"""The checks of a logits cache's manifest that need none of its data (cache/logits.py): verify runs them
(verify/logits.py, with the data checks), and `finetune --logits` runs them before training, as `open_cache` runs
verify's manifest checks for `train` — so a hand-edited manifest is one line, never a run on it."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from g2sd_cache.cache.schema import CONFIG, TMP_MARK, shard_name


def manifest_problems(cache) -> list[str]:
    """`layout_problems` of an open LogitsCache as problem lines ("where: what")."""
    return [f"{where}: {what}" for where, what in layout_problems(cache.root, cache.manifest)]


def layout_problems(root: Path, m) -> list[tuple[str, str]]:
    """(where, what) for every problem of the manifest `m` of the logits cache at `root` found without reading its
    data: leftover temporaries, shard folders vs the manifest, shards tiling the epoch, counts, the plan's classes
    and images, config.yaml's teacher, plan and settings."""
    problems: list[tuple[str, str]] = []
    add = lambda where, what: problems.append((where, what))  # noqa: E731
    for p in sorted(root.rglob(f"*{TMP_MARK}*")):
        add(p.relative_to(root).parts[0], f"leftover temporary {p.relative_to(root)} (an interrupted write; "
            f"rerun extract-logits, or delete it)")
    listed = [s["name"] for s in m.shards]
    on_disk = sorted(p.name for p in root.iterdir() if p.is_dir() and TMP_MARK not in p.name)
    for name in sorted(set(on_disk) - set(listed)):
        add(name, "is on disk but not in the manifest")
    for name in sorted(set(listed) - set(on_disk)):
        add(name, "is in the manifest but missing on disk")
    expected = [(a, min(m.shard_groups, m.groups_per_epoch - a)) for a in range(0, m.groups_per_epoch, m.shard_groups)]
    got = [(s["first_group"], s["groups"]) for s in m.shards]
    if got != expected or listed != [shard_name(i) for i in range(len(expected))]:
        add("manifest.json", f"shards do not tile the {m.groups_per_epoch} groups of an epoch in runs of "
            f"{m.shard_groups}")
    if m.samples != m.epochs * m.groups_per_epoch * m.group_size:
        add("manifest.json", f"samples {m.samples} != {m.epochs} epochs x {m.groups_per_epoch} groups x "
            f"{m.group_size}")
    if m.bytes != sum(sum(s["files"].values()) for s in m.shards):
        add("manifest.json", "bytes is not the sum of the shards' file sizes")
    plan = m.plan if isinstance(m.plan, dict) else {}
    recipe = plan.get("recipe") if isinstance(plan.get("recipe"), dict) else {}
    if not isinstance(plan.get("classes"), list) or m.num_classes != len(plan["classes"]):
        add("manifest.json", f"num_classes {m.num_classes} is not the number of the plan's classes")
    if m.group_size != recipe.get("group_size") or not isinstance(plan.get("num_images"), int) \
            or m.groups_per_epoch != plan["num_images"] // m.group_size:
        add("manifest.json", f"groups_per_epoch {m.groups_per_epoch} x group_size {m.group_size} does not "
            f"match the plan's {plan.get('num_images')} images")
    try:
        config = yaml.safe_load((root / CONFIG).read_text())
    except (OSError, yaml.YAMLError) as e:
        add(CONFIG, f"cannot be read ({type(e).__name__})")
        return problems
    if not isinstance(config, dict) or config.get("teacher_sha256") != m.teacher.get("sha256") \
            or json.loads(json.dumps(config.get("plan"))) != m.plan:
        add(CONFIG, "names another teacher or plan than manifest.json")
        return problems
    settings = {"cached_epochs": m.epochs, "topk": m.topk, "shard_groups": m.shard_groups, "group_size": m.group_size}
    changed = [k for k, v in settings.items() if config.get(k) != v]
    if changed:
        add(CONFIG, f"{', '.join(changed)} differ from manifest.json")
    return problems
