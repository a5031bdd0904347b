"""benchmarks/study.py's report: the markdown table of the arms and the two-panel plot (held-out loss
against K and against bytes per view), from the --json report."""
from __future__ import annotations

from g2sd_cache.benchmarks.fidelity.paired import RESOLUTION, SIGMAS, verdict
from g2sd_cache.benchmarks.report import table as markdown_table


def _pm(stat: dict, fmt: str) -> str:
    """mean ± std (std without a sign)."""
    return format(stat["mean"], fmt) + (f" ± {format(stat['std'], fmt.lstrip('+'))}" if stat["std"] is not None else "")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def table(report: dict) -> str:
    cfg = report["config"]
    online = next(a for a in report["arms"] if a["name"] == "online")["heldout_loss"]["mean"]
    lines = [f"## What the cache costs the student ({cfg['profile']} profile: {cfg['teacher']} {cfg['arch']} -> "
             f"{cfg['student']}, {cfg['train_images']} training / {cfg['heldout_images']} held-out images, "
             f"{cfg['steps']} steps of {cfg['batch_size']} = {cfg['epochs']} epochs, seeds {cfg['seeds']})",
             ""]
    num = lambda v: f"{v:,.0f}" if v is not None else "—"   # noqa: E731
    rows = [[a["name"], str(a["views"] or "fresh"), a["codec"] or "—", a.get("pixels") or "—",
             num(a["bytes_per_view"]), num(a.get("pixel_bytes_per_view")), num(a.get("total_bytes_per_view")),
             _pm(a["heldout_loss"], ".5f"), _pm(a["heldout_cosine"], ".4f"), _pm(a["train_loss"], ".5f"),
             _pm(a["gap_to_online"], "+.5f"),
             _pm({k: None if v is None else 100 * v / online for k, v in a["gap_to_online"].items()}, "+.2f") + " %"]
            for a in report["arms"]]
    lines.append(markdown_table(["arm", "K", "codec", "pixels", "target B/view", "pixel B/view", "total B/view",
                                 "held-out loss", "held-out cosine",
                                 "train loss", "gap to online", "gap / online"], rows))
    lines += ["", f"untrained student (same initialisation): held-out loss "
                  f"{_pm(cfg['untrained_student']['heldout_loss'], '.5f')}, cosine "
                  f"{_pm(cfg['untrained_student']['heldout_cosine'], '.4f')}. "
                  f"± is the standard deviation over seeds; the gap is paired seed by seed. "
                  f"Runtime {_duration(cfg['runtime_s'])}."]
    paired = paired_table(report)
    return "\n".join(lines + (["", paired] if paired else []))


def paired_table(report: dict) -> str:
    """Each arm against its fp16 reference at the same K (fidelity/paired.py): mean paired gap ± its standard
    error, in loss and in % of online's loss, and the verdict. Empty for a report without references."""
    rows = []
    for a in report["arms"]:
        g = a.get("gap_to_reference")
        if not g:
            continue
        se = lambda v, fmt: "" if v is None else f" ± {format(v, fmt)}"   # noqa: E731
        yes = lambda v: "—" if v is None else "yes" if v else "no"       # noqa: E731
        rows.append([a["name"], a["reference"], f"{g['mean']:+.6f}{se(g['sem'], '.6f')}",
                     f"{g['mean_pct']:+.2f}{se(g['sem_pct'], '.2f')} %", yes(g["resolved"]), yes(g["within_2se"]),
                     verdict(g)])
    if not rows:
        return ""
    return "\n".join([
        "### Paired against fp16 at the same K and pixels (the codec's own cost; fp16 with other pixels: the "
        "pixel mode's own cost)", "",
        markdown_table(["arm", "reference", "gap to reference", "gap / online", f"SE < {100 * RESOLUTION:.0f} %",
                        f"within {SIGMAS:.0f} SE of 0", "verdict"], rows),
        "", f"± is the standard error of the mean paired gap over {len(report['config']['seeds'])} seeds "
            "(std / sqrt(seeds)); parity = resolved and within 2 SE of zero."])


def plot(report: dict, path: str) -> None:
    """Two panels: each arm's held-out loss relative to online (the paired gap, % of online's loss, ± its std
    over seeds) against K, and against the stored target bytes per view at --codec-views K. The gap is plotted
    rather than the loss itself because the seeds' spread of the loss (mostly the initialisation, shared by
    every arm of a seed) would hide differences the pairing resolves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, cfg = report["arms"], report["config"]
    online = next(a for a in arms if a["name"] == "online")["heldout_loss"]["mean"]
    rel = lambda a: 100 * a["gap_to_online"]["mean"] / online            # noqa: E731
    rel_std = lambda a: 100 * (a["gap_to_online"]["std"] or 0) / online  # noqa: E731
    paired = [a for a in arms if a.get("gap_to_reference") and a.get("total_bytes_per_view")]
    fig, axes = plt.subplots(1, 4 if paired else 3, figsize=(21 if paired else 16, 4.4))
    a1, a2, a3 = axes[:3]
    for ax in (a1, a2, a3):
        ax.axhline(0, color="C3", label=f"online (fresh views), loss {online:.4g}")
        ax.set_ylabel("held-out loss − online's (% of online)")
    cached = sorted((a for a in arms if a["name"].startswith("cached-k")), key=lambda a: a["views"])
    if cached:
        a1.errorbar([a["views"] for a in cached], [rel(a) for a in cached], yerr=[rel_std(a) for a in cached],
                    marker="o", capsize=3, label=f"cached, {cfg['default_codec']}")
        a1.set_xscale("log", base=2)
        a1.set_xticks([a["views"] for a in cached], [str(a["views"]) for a in cached])
    a1.set_xlabel("cached views per image K")
    a1.set_title("Held-out loss vs views per image")
    at_k = [a for a in arms if a["views"] == cfg["codec_views"]]
    a2.errorbar([a["bytes_per_view"] for a in at_k], [rel(a) for a in at_k], yerr=[rel_std(a) for a in at_k],
                marker="o", capsize=3, linestyle="none", label=f"cached, K = {cfg['codec_views']}")
    for x in sorted({a["bytes_per_view"] for a in at_k}):   # codecs of one size share a point's label
        same = [a for a in at_k if a["bytes_per_view"] == x]
        a2.annotate(", ".join(a["codec"] for a in same), (x, max(rel(a) for a in same)), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)
    a2.set_xlabel("stored target bytes per view")
    a2.set_title("Held-out loss vs bytes per view")
    _pareto(a3, [a for a in arms if a.get("total_bytes_per_view")], rel, rel_std)
    if paired:
        _paired_panel(axes[3], paired)
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle(f"teacher {cfg['teacher']} {cfg['arch']} -> {cfg['student']}: {cfg['steps']} steps ({cfg['epochs']} epochs of "
                 f"{cfg['train_images']} images), held-out {cfg['heldout_images']} images; ± std of the paired gap "
                 f"over {len(cfg['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)



def _pareto(ax, cached: list, rel, rel_std) -> None:
    """Every cached arm at its total bytes per view (targets + pixels + the rest), the Pareto front (no other
    arm is both smaller and closer to online) joined by a line."""
    if not cached:
        return
    for a in cached:
        ax.errorbar([a["total_bytes_per_view"]], [rel(a)], yerr=[rel_std(a)], marker="o" if a.get("pixels") != "jpeg"
                    else "s", capsize=3, color="C0" if a.get("pixels") != "jpeg" else "C2", linestyle="none")
        ax.annotate(a["name"], (a["total_bytes_per_view"], rel(a)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front, best = [], float("inf")
    for a in sorted(cached, key=lambda a: (a["total_bytes_per_view"], rel(a))):
        if rel(a) < best:
            front.append(a)
            best = rel(a)
    ax.plot([a["total_bytes_per_view"] for a in front], [rel(a) for a in front], color="C1", label="Pareto front")
    ax.plot([], [], "o", color="C0", label="exact pixels")
    ax.plot([], [], "s", color="C2", label="jpeg pixels")
    ax.set_xscale("log")
    ax.set_xlabel("total bytes per view on disk (targets + pixels + metadata)")
    ax.set_title("Pareto: held-out gap vs bytes per view")


def _paired_panel(ax, arms: list) -> None:
    """Each arm's paired gap to its fp16 reference (same K, same pixels), % of online's loss, ± 2 standard
    errors, at its total bytes per view; the band of ±1 % marks the resolution the issue asks for."""
    ax.axhline(0, color="C3", label="fp16 at the same K and pixels")
    ax.axhspan(-100 * RESOLUTION, 100 * RESOLUTION, color="C3", alpha=0.08, label=f"± {100 * RESOLUTION:.0f} % of online")
    for a in arms:
        g = a["gap_to_reference"]
        ax.errorbar([a["total_bytes_per_view"]], [g["mean_pct"]], yerr=[SIGMAS * (g["sem_pct"] or 0)], capsize=3,
                    marker="s" if a.get("pixels") == "jpeg" else "o", color="C2" if a["codec"] == "fp16" else "C0",
                    linestyle="none")
        ax.annotate(f"{a['name']} ({verdict(g)})", (a["total_bytes_per_view"], g["mean_pct"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("total bytes per view on disk")
    ax.set_ylabel("held-out loss − reference's (% of online), ± 2 SE")
    ax.set_title("vs fp16 at the same K and pixels (green: pixel mode)")
