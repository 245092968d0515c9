"""benchmarks/learning.py's bookkeeping and report: committed records, weight digests, tables, chart.

Records: every finished run's result (and each seed's exploration summary) is kept as a small JSON
file under `RECORDS` (`--records`), the tables' source when `--out` no longer has a run. Which stored
results count: `made_from` (made from this SFT run, or from identical SFT weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path

from rl_agents.trajectory import atomic_write_text

LABELS = {"sft": "SFT", "rft": "RFT", "dpo": "DPO (fixed pairs)", "eto": "ETO", "dmpo_noisy": "DMPO (noisy)",
          "dmpo_clean": "DMPO (clean)", "step_dpo": "StepAgent-implicit", "step_gail": "StepAgent-inverse",
          "ppo": "PPO", "best_of_n": "Best-of-N of SFT (oracle)"}
SPLITS = ("test_seen", "test_unseen")
MARK_START, MARK_END = "<!-- learning-benchmark:start -->", "<!-- learning-benchmark:end -->"

# ---- records (committed copies of finished results) ------------------------------------------------
RECORDS: Path | None = None  # set by learning.main() from --records




def record_path(env_name: str, seed: int | None, name: str) -> Path | None:
    if RECORDS is None:
        return None
    return RECORDS / env_name / (f"seed{seed}/{name}.json" if seed is not None else f"{name}.json")


def keep_record(env_name: str, seed: int | None, name: str, data: dict) -> None:
    """Copy a finished result into --records (atomically; unchanged content is not rewritten)."""
    path = record_path(env_name, seed, name)
    if path is None:
        return
    text = json.dumps(data, indent=2, default=str) + "\n"
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)


def read_record(env_name: str, seed: int | None, name: str) -> dict | None:
    path = record_path(env_name, seed, name)
    return json.loads(path.read_text()) if path is not None and path.exists() else None


def weights_sha256(policy: str | os.PathLike) -> str | None:
    """Digest of a policy's weights: its *.safetensors files, by name, in name order."""
    files = sorted(Path(policy).glob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def made_from(result: dict | None, algo: str, sft: dict | None) -> bool:
    """Whether a stored result is finished and was made from this SFT run (or from identical weights)."""
    if not result or result.get("error"):
        return False
    if algo == "sft":
        return True
    if not sft:
        return False
    digest = sft.get("policy_sha256")
    return result.get("sft_run_id") == sft["run_id"] or (digest is not None and result.get("sft_policy_sha256") == digest)


def with_digests(result: dict, algo: str, sft: dict | None, path: Path) -> dict:
    """Add the weight digests to a result made before they were recorded (written back to `path`)."""
    if algo == "sft" and "policy_sha256" not in result and Path(result.get("policy", "")).is_dir():
        result["policy_sha256"] = weights_sha256(result["policy"])
    elif algo != "sft" and "sft_policy_sha256" not in result and sft and result.get("sft_run_id") == sft["run_id"]:
        result["sft_policy_sha256"] = sft.get("policy_sha256")
    else:
        return result
    atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
    return result


# ---- report --------------------------------------------------------------------------------------
def _mean_std(xs: list[float], scale: float = 1.0, fmt: str = ".3f", unit: str = "") -> str:
    if not xs:
        return "—"
    mean = statistics.fmean(xs) * scale
    if len(xs) < 2:
        return f"{mean:{fmt}}{unit}"
    return f"{mean:{fmt}} ± {statistics.stdev(xs) * scale:{fmt}}{unit}"


def env_table(env: dict, results: dict, seeds: list[int], algos: list[str]) -> str:
    """results[(seed, algo)] -> stored result (or None); one row per algorithm."""
    head = ("| algorithm | test_seen reward | test_seen success (%) | test_unseen reward | test_unseen success (%) "
            "| seeds | tasks (seen/unseen) | wall (min) |\n|---|---|---|---|---|---|---|---|")
    lines, notes = [head], []
    for algo in algos:
        ok = [results[(s, algo)] for s in seeds if results.get((s, algo)) and not results[(s, algo)].get("error")]
        for s in seeds:
            r = results.get((s, algo))
            if r is None:
                notes.append(f"{LABELS[algo]}, seed {s}: not run")
            elif r.get("error"):
                notes.append(f"{LABELS[algo]}, seed {s}: failed: {r['error'].splitlines()[0][:300]}")
        cells = []
        for split in SPLITS:
            cells.append(_mean_std([r["metrics"][f"eval/{split}/avg_reward"] for r in ok]))
            cells.append(_mean_std([r["metrics"][f"eval/{split}/success_rate"] for r in ok], 100, ".1f"))
        tasks = "/".join(str(ok[0]["num_tasks"].get(s, "?")) for s in SPLITS) if ok else "—"
        wall = _mean_std([r["wall_s"] for r in ok], 1 / 60, ".1f")
        lines.append(f"| {LABELS[algo]} | " + " | ".join(cells) + f" | {len(ok)}/{len(seeds)} | {tasks} | {wall} |")
    sources: dict[str, list[str]] = {}  # records kept from elsewhere say where they come from
    earlier: dict[tuple[int, str], list[str]] = {}  # runs reported with --earlier-sft, by (seed, SFT run)
    for (s, algo), r in sorted(results.items(), key=lambda kv: (kv[0][0], algos.index(kv[0][1]))):
        if r and not r.get("error") and r.get("source"):
            sources.setdefault(r["source"], []).append(f"{LABELS[algo]} seed {s}")
        if r and r.get("earlier_sft"):
            earlier.setdefault((s, r["earlier_sft"]), []).append(LABELS[algo])
    notes += [f"{', '.join(runs)}: {source}" for source, runs in sources.items()]
    notes += [f"{', '.join(labels)}, seed {s}: made from an earlier SFT run of seed {s} (`{run}`), not from the one "
              f"in the SFT row (same settings; `--earlier-sft`)" for (s, run), labels in earlier.items()]
    text = "\n".join(lines) + "\n"
    return text + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")


def explorations(env_name: str, seeds: list[int], out: Path, results: dict) -> list[dict]:
    """Each seed's shared-exploration summary of its current SFT run: from --out, else the records."""
    found = []
    for seed in seeds:
        sft, path = results.get((seed, "sft")), out / env_name / f"seed{seed}" / "explore" / "summary.json"
        # the SFT run whose exploration the table's rows read: the current one, or one reported with --earlier-sft
        earlier = {r["earlier_sft"] for (s, _), r in results.items() if s == seed and r and r.get("earlier_sft")}
        for summary in (json.loads(path.read_text()) if path.exists() else None, read_record(env_name, seed, "explore")):
            if made_from(summary, "explore", sft):
                summary.setdefault("sft_policy_sha256", sft.get("policy_sha256"))
                keep_record(env_name, seed, "explore", summary)
                found.append(summary)
                break
            if summary and summary.get("sft_run_id") in earlier:
                found.append({**summary, "seed": seed, "earlier_sft": summary["sft_run_id"]})
                break
    return found


def explore_line(found: list[dict], temperature: float) -> str:
    if not found:
        return ""
    return (f"SFT agent's shared exploration (T = {temperature}): success "
            f"{_mean_std([f['success_rate'] for f in found], 100, '.1f', '%')}, avg reward "
            f"{_mean_std([f['avg_reward'] for f in found])} over {len(found)} seed(s), "
            f"{_mean_std([f['seconds'] for f in found], 1 / 60, '.1f')} min each"
            + "".join(f"; seed {f['seed']}'s by its earlier SFT run `{f['earlier_sft']}`" for f in found if f.get("earlier_sft"))
            + ".\n")


def bar_chart(per_env: dict, seeds: list[int], algos: list[str], path: Path) -> None:
    """Success rate and average reward per algorithm (mean over seeds, std as error bars), per env."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(per_env), 2, figsize=(14, 4.2 * len(per_env)), squeeze=False)
    for row, (name, results) in zip(axes, per_env.items()):
        for ax, key, title in ((row[0], "success_rate", "success rate"), (row[1], "avg_reward", "average reward")):
            for k, split in enumerate(SPLITS):
                means, stds = [], []
                for algo in algos:
                    xs = [results[(s, algo)]["metrics"][f"eval/{split}/{key}"] for s in seeds
                          if results.get((s, algo)) and not results[(s, algo)].get("error")]
                    means.append(statistics.fmean(xs) if xs else float("nan"))
                    stds.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
                ax.bar([i + (k - 0.5) * 0.4 for i in range(len(algos))], means, 0.4, yerr=stds, capsize=2, label=split)
            ax.set_xticks(range(len(algos)), [LABELS[a] for a in algos], rotation=30, ha="right", fontsize=8)
            ax.set_ylim(0, 1.02)
            ax.set_title(f"{name}: {title}")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_section(path: Path, text: str) -> None:
    """Put `text` between the markers in `path` (kept: the rest of the file; created if missing)."""
    block = f"{MARK_START}\n{text.rstrip()}\n{MARK_END}\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if MARK_START in old and MARK_END in old:
        head, rest = old.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1].strip("\n")
        new = head + block + (f"\n{tail}\n" if tail else "")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block
    atomic_write_text(path, new)
