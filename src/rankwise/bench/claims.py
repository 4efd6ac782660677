"""The papers' claims, checked against a bench's measured perplexities: ``claims.md``.

Each claim says method A reaches a lower validation perplexity than method B (``margin``: "comes close" = A within
``margin`` of B, i.e. ``ppl_A < (1 + margin) ppl_B``), possibly at a memory condition. The row shows both measured
values (mean +- sd over seeds), the difference ``d = (1 + margin) ppl_B - ppl_A`` and ``d / s`` with the seed spread
``s = sqrt(sd_A^2 + sd_B^2)`` (the sd of the difference of two single runs): held when ``d > s``, did not hold when
``d < -s``, a tie otherwise. With one seed there is no spread: the verdict only gives the sign, marked "1 seed".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

BEST_OTHER = "*best other*"


@dataclass(frozen=True)
class Claim:
    text: str
    source: str
    a: str  # method name (the preset's key, the label before ":")
    b: str  # method name, or BEST_OTHER: the best of the other methods
    margin: float = 0.0
    memory: str = "any"  # "equal": at the same --match-memory budget; "less": A at less memory than B
    ratio: float | None = None  # with "less": the memory ratio A/B the claim is about (the closest pair is used)


CLAIMS = [
    Claim("FRUGAL beats GaLore at equal memory", "FRUGAL (Zmushko et al. 2025)", "frugal", "galore", memory="equal"),
    Claim("Fira beats GaLore", "Fira (Chen et al. 2024)", "fira", "galore", memory="equal"),
    Claim("APOLLO beats GaLore", "APOLLO (Zhu et al. 2024), Table 2", "apollo", "galore", memory="equal"),
    Claim("APOLLO-Mini beats GaLore at less memory", "APOLLO (Zhu et al. 2024), Tables 2-3", "apollo-mini", "galore",
          memory="less"),
    Claim("low-rank + refactorization + momentum reset beats GaLore at ~25% less memory",
          "Glentis et al. 2025 (benchmark paper)", "lowrank-rr", "galore", memory="less", ratio=0.75),
    Claim("low-rank + refactorization + momentum reset beats Fira at ~25% less memory",
          "Glentis et al. 2025 (benchmark paper)", "lowrank-rr", "fira", memory="less", ratio=0.75),
    Claim("tuned full-rank AdamW is best", "Glentis et al. 2025 (benchmark paper)", "full", BEST_OTHER),
    Claim("SLTrain comes close to full-rank (within 5% ppl) at less memory", "SLTrain (Han et al. 2024)", "sltrain",
          "full", margin=0.05, memory="less"),
    Claim("ReLoRA trails full-rank", "GaLore (Zhao et al. 2024), Table 2", "full", "relora"),
    Claim("LoRA trails full-rank", "GaLore (Zhao et al. 2024), Table 2", "full", "lora"),
    Claim("SwitchLoRA beats full-rank (15.01 vs 15.23 ppl at LLaMA 1.3B)", "SwitchLoRA (Zhou et al. 2024, "
          "arXiv 2406.06564, abstract)", "switchlora", "full"),
]


def verdict(mean_a: float, sd_a: float, mean_b: float, sd_b: float, n: int, margin: float = 0.0
            ) -> tuple[float, float | None, str]:
    """``(d, d / spread, verdict)`` for "A's ppl is below (1 + margin) B's" (see the module docstring)."""
    d = (1 + margin) * mean_b - mean_a
    spread = math.sqrt(sd_a**2 + sd_b**2)
    if n < 2 or spread == 0:
        return d, None, ("held" if d > 0 else "did not hold") + (" (1 seed: no spread)" if n < 2 else "")
    z = d / spread
    return d, z, "held" if z > 1 else "did not hold" if z < -1 else "tie"


def _name(group: dict[str, Any]) -> str:
    return group["label"].partition(":")[0]


def _pairs(claim: Claim, groups: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """The (A, B, note) comparisons that a claim is checked on."""
    a_groups = [g for g in groups if _name(g) == claim.a]
    if claim.b == BEST_OTHER:
        others = [g for g in groups if _name(g) != claim.a]
        if not a_groups or not others:
            return []
        best_a = min(a_groups, key=lambda g: g["ppl_mean"])
        return [(best_a, min(others, key=lambda g: g["ppl_mean"]), "")]
    b_groups = [g for g in groups if _name(g) == claim.b]
    if not a_groups or not b_groups:
        return []
    same = [(a, b) for a in a_groups for b in b_groups if a["budget"] is not None and a["budget"] == b["budget"]]
    if claim.memory == "less":
        less = [(a, b) for a in a_groups for b in b_groups if a["train_mem_mb"] < b["train_mem_mb"]]
        if not less:
            a, b = a_groups[0], b_groups[0]
            return [(a, b, "memory not less")]
        if claim.ratio is not None:
            a, b = min(less, key=lambda p: (abs(p[0]["train_mem_mb"] / p[1]["train_mem_mb"] - claim.ratio),
                                            p[0]["ppl_mean"]))
        else:
            a, b = max(less, key=lambda p: (p[0]["train_mem_mb"] / p[1]["train_mem_mb"], -p[0]["ppl_mean"]))
        return [(a, b, "")]
    if same:
        return [(a, b, "") for a, b in same]
    a, b = min(a_groups, key=lambda g: g["ppl_mean"]), min(b_groups, key=lambda g: g["ppl_mean"])
    note = "" if claim.memory == "any" or abs(a["train_mem_mb"] / b["train_mem_mb"] - 1) < 0.05 else \
        "memory not equal (run --match-memory)"
    return [(a, b, note)]


def check_claims(groups: list[dict[str, Any]], claims: list[Claim] = CLAIMS) -> list[dict[str, Any]]:
    """One row per (claim, comparison); a claim whose methods were not run says so."""
    rows = []
    for c in claims:
        pairs = _pairs(c, groups)
        if not pairs:
            rows.append({"claim": c.text, "source": c.source, "verdict": f"not run (needs {c.a} and "
                         f"{'another method' if c.b == BEST_OTHER else c.b} in --methods)"})
            continue
        for a, b, note in pairs:
            n = min(a["n"], b["n"])
            d, z, v = verdict(a["ppl_mean"], a["ppl_sd"], b["ppl_mean"], b["ppl_sd"], n, c.margin)
            if note == "memory not less":
                v = "did not hold (memory not less)"
            rows.append({"claim": c.text, "source": c.source, "a": a["group"], "b": b["group"],
                         "a_ppl": a["ppl_mean"], "a_sd": a["ppl_sd"], "b_ppl": b["ppl_mean"], "b_sd": b["ppl_sd"],
                         "a_mem_mb": a["train_mem_mb"], "b_mem_mb": b["train_mem_mb"], "margin": c.margin,
                         "diff": d, "z": z, "verdict": v, "note": note, "n": n})
    return rows


def claims_markdown(rows: list[dict[str, Any]]) -> str:
    def val(p: float, sd: float, mem: float) -> str:
        return f"{p:.1f} ± {sd:.1f} ({mem:.1f} MiB)"

    lines = ["| claim | source | A | ppl A (memory) | B | ppl B (memory) | d (ppl) | d / spread | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "a" not in r:
            lines.append(f"| {r['claim']} | {r['source']} | | | | | | | {r['verdict']} |")
            continue
        z = "-" if r["z"] is None else f"{r['z']:+.1f}"
        note = f" — {r['note']}" if r["note"] and "memory not less" not in r["verdict"] else ""
        lines.append(f"| {r['claim']} | {r['source']} | {r['a']} | {val(r['a_ppl'], r['a_sd'], r['a_mem_mb'])} | "
                     f"{r['b']} | {val(r['b_ppl'], r['b_sd'], r['b_mem_mb'])} | {r['diff']:+.1f} | {z} | "
                     f"**{r['verdict']}**{note} |")
    return "\n".join(lines)
