"""The paper's comparison in the toy world: ``python -m parrot_jax.analysis.table``.

Trains, under one budget (``--iterations``, ``--num_groups`` x 8 images per iteration) and for
each of ``--seeds``, every method below with ``configs/toy.py``, then scores each on the
held-out prompts exactly as ``train.py`` ends a run
(``final_eval.json``: paired noise, all identifiers, prompt-centred guidance):

- ``base``: the untrained models (read from the Parrot runs' own base evaluations);
- ``weighted_sum``: a scalarised reward with equal weights, no Pareto selection (DPOK-style);
- ``weighted_sum_0.7``: weights (0.7, 0.1, 0.1, 0.1);
- ``single``: aesthetics alone;
- ``t2i_only`` / ``pen_only``: Parrot with the PEN / the T2I model frozen;
- ``parrot_no_pcg``: the Parrot runs scored with plain guidance on the identified expansion
  (``w1 = 0``: no original-prompt-centred term);
- ``parrot``: the method.

Writes ``--out/table.md`` (mean ± std over seeds of every reward, both hypervolumes and the pixel
oracle metrics), ``table.json``, ``table.png`` (``bar_chart``: each method's change from base
per reward), ``identifiers.md`` (the Parrot runs and the untrained models scored with each
identifier alone, and the difference) and ``evidence.md`` (``evidence``: the checks the
method should pass, each with its numbers).
Hypervolumes here are measured from references shared by every run, so they compare across
methods: ``hypervolume`` pools all images (from each reward's minimum over every image of every
run); ``hypervolume_per_prompt`` is the mean over held-out prompts of each prompt's hypervolume
(from that prompt's minimum over every run). The pooled one is set by the few prompts whose
images reach furthest; the per-prompt one weighs every prompt. Runs are kept under
``--out/runs``; rerunning skips finished ones.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags

from parrot_jax import cli, config_files, policy, scoring
from parrot_jax import config as schema
from parrot_jax.toyworld import assets
from parrot_jax.training import train_and_evaluate
from parrot_jax.training.final_eval import final_evaluation_of
from parrot_jax.training.visualize import png_bytes

PROG = "python -m parrot_jax.analysis.table"
ROOT = Path(__file__).resolve().parents[2]
# method -> (configs/toy.py variant, config overrides)
TRAINED = {
    "weighted_sum": ("weighted_sum", {}),
    "weighted_sum_0.7": ("weighted_sum", {"advantage.weights": (0.7, 0.1, 0.1, 0.1)}),
    "single": ("single", {"advantage.reward_index": 0}),
    "t2i_only": ("t2i_only", {}),
    "pen_only": ("pen_only", {}),
    "parrot": ("", {}),
}
METHODS = ("base", "weighted_sum", "weighted_sum_0.7", "single", "t2i_only", "pen_only",
           "parrot_no_pcg", "parrot")
NO_PCG_FILE = "final_eval_no_pcg.json"
IDENTIFIER_FILE = "identifiers.json"


def toy_config(variant: str) -> Any:
    return config_files.load_module(ROOT / "configs" / "toy.py").get_config(variant or None)


def run_method(method: str, seed: int, iterations: int, out: Path, num_groups: int = 8) -> Path:
    """Train ``method`` with ``seed`` (unless done) -> its workdir (with final_eval.json)."""
    workdir = out / "runs" / f"{method}_seed{seed}"
    if (workdir / "final_eval.json").is_file():
        return workdir
    variant, overrides = TRAINED[method]
    config = toy_config(variant)
    config.seed = seed
    config.final_eval.seed = seed
    config.num_iterations = iterations
    config.num_groups = num_groups
    schema.apply(config, overrides)
    print(f"[table] {method}, seed {seed}: {iterations} iterations -> {workdir}",
          file=sys.stderr, flush=True)
    train_and_evaluate(config, workdir)
    return workdir


def no_pcg_evaluation(workdir: Path) -> dict[str, Any]:
    """The Parrot run of ``workdir`` scored with ``w1 = 0`` (plain guidance on the expansion)."""
    path = workdir / NO_PCG_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return final_evaluation_of(workdir, filename=NO_PCG_FILE, w1=0.0)


def identifier_study(workdir: Path, prompts: Sequence[str], num_images: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean rewards ``[K, K]`` with identifier k alone (row k), of the trained Parrot run and
    of the untrained models on the same prompts and noise: ``(trained, base)``.

    The base row matters: the untrained models already respond to the identifier tokens (the
    toy CLIP never saw them, so their embeddings move its text features arbitrarily), and
    that response, not training, can decide which identifier gives the highest value of a
    reward. What training taught an identifier is ``trained - base`` in its row. Kept in
    ``workdir/identifiers.json`` for the same prompts, image count and seed.
    """
    path = workdir / IDENTIFIER_FILE
    settings = {"prompts": list(prompts), "num_images": num_images, "seed": seed}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["settings"] == settings and "base" in saved:
            return np.asarray(saved["mean"]), np.asarray(saved["base"])
    trained, base = policy.load(workdir, base=True)
    try:
        study = []
        for loaded in (trained, base):
            rows = []
            for k in range(len(loaded.models.rewards.names)):
                values = scoring.score(loaded, prompts, identifiers=[k], w1=5.0, w2=5.0,
                                        expand_prompt=True, greedy=True,
                                        num_images=num_images, seed=seed, batch_prompts=8)
                rows.append(values.mean(axis=0))
            study.append(np.stack(rows))
    finally:
        trained.models.rewards.close()
    path.write_text(json.dumps({"settings": settings, "mean": study[0].tolist(),
                                "base": study[1].tolist()}) + "\n")
    return study[0], study[1]


def shared_hypervolumes(records: dict[str, list[dict]], names: Sequence[str]
                        ) -> tuple[dict[str, dict[str, list[float]]], list[float]]:
    """Per method and seed, both hypervolumes of its images' reward vectors
    (``{"hypervolume": {method: [per seed]}, "hypervolume_per_prompt": {...}}``), each from
    references shared by every record: the pooled one from each reward's minimum over every
    image of every record (returned too), the per-prompt one from each prompt's minimum
    (``scoring.with_hypervolumes`` over all records at once)."""
    values = {(m, i): np.asarray(r["details"]["values"]["base" if m == "base" else "trained"],
                                 np.float64)
              for m, rs in records.items() for i, r in enumerate(rs)}
    for field in ("prompts", "num_images"):  # per-prompt references need the same rows
        seen = {r["details"][field] for rs in records.values() for r in rs}
        if len(seen) != 1:
            raise ValueError(f"records were scored with different details.{field}: "
                             f"{sorted(seen)}")
    num_images = next(iter(records.values()))[0]["details"]["num_images"]
    results, reference = scoring.with_hypervolumes(values, names, num_images=num_images)
    return ({key: {m: [results[(m, i)][key] for i in range(len(rs))]
                   for m, rs in records.items()}
             for key in ("hypervolume", "hypervolume_per_prompt")}, reference)


def summarise(records: dict[str, list[dict]], names: Sequence[str]) -> dict[str, Any]:
    """``{method: {metric: (mean, std over seeds)}}`` for every reward, the shared-reference
    hypervolumes (pooled and per prompt) and the oracle metrics."""
    volumes, reference = shared_hypervolumes(records, names)
    table: dict[str, Any] = {}
    for method, rs in records.items():
        label = "base" if method == "base" else "trained"
        keys = list(names) + sorted(k for k in rs[0][label] if k.startswith("oracle/"))
        row = {k: [r[label][k] for r in rs] for k in keys}
        for key, per_method in volumes.items():
            row[key] = per_method[method]
        table[method] = {k: (float(np.mean(v)), float(np.std(v))) for k, v in row.items()}
    return {"methods": table, "hypervolume_reference": reference}


# Oracle metrics that should move with a learned reward (sign: +1 = up with the reward), from
# labels.py's rules: aesthetics = contrast and sharp edges; preference and alignment = the
# prompted colour and shape (preference also vivid and large).
ORACLE_OF = {
    "aesthetics": (("contrast", 1), ("sharpness", 1)),
    "human_preference": (("hue_error", -1), ("shape_iou", 1), ("saturation", 1), ("area", 1)),
    "alignment": (("hue_error", -1), ("shape_iou", 1)),
}


def evidence(summary: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Issue 9's checks on a summary: ``(claim, measured, holds)`` for each.

    Parrot's hypervolumes (pooled, and per prompt) above both weighted sums'; no reward of
    Parrot's below base by more than Parrot's seed std; each identifier alone raising its own
    reward, over the untrained models with the same identifier, more than the other
    identifiers raise it (the diagonal of ``trained - base`` is each column's maximum;
    ``identifier_study``); prompt-centred guidance above plain guidance on alignment; and, per
    reward Parrot raised, the oracle metrics that should move with it (``ORACLE_OF``) moving the
    right way."""
    methods = summary["methods"]
    parrot, base = methods["parrot"], methods["base"]
    out = []
    for key, what in (("hypervolume", "hypervolume"),
                      ("hypervolume_per_prompt", "per-prompt hypervolume")):
        hv = parrot[key][0]
        for ws in ("weighted_sum", "weighted_sum_0.7"):
            other = methods[ws][key][0]
            out.append((f"Parrot's {what} exceeds {ws}'s", f"{hv:.4g} vs {other:.4g}",
                        hv > other))
    names = summary["identifiers"]["rewards"]
    for n in names:
        change, std = parrot[n][0] - base[n][0], parrot[n][1]
        out.append((f"{n}: Parrot no lower than base by more than its seed std",
                    f"{change:+.4g} (std {std:.2g})", change >= -std))
    shift = np.asarray(summary["identifiers"]["mean"]) - np.asarray(
        summary["identifiers"]["base"])
    for k, n in enumerate(names):
        column = shift[:, k]
        best = int(np.argmax(column))
        out.append((f"<reward {k + 1}> alone raises {n} over base the most",
                    f"{column[k]:+.4g}; best <reward {best + 1}> {column[best]:+.4g}",
                    best == k))
    pcg, plain = parrot["alignment"][0], methods["parrot_no_pcg"]["alignment"][0]
    out.append(("prompt-centred guidance raises alignment over plain guidance on the expansion",
                f"{pcg:.4g} vs {plain:.4g}", pcg > plain))
    for n, metrics in ORACLE_OF.items():
        change = parrot[n][0] - base[n][0]
        if change <= 0:
            continue
        for metric, sign in metrics:
            key = f"oracle/{metric}"
            if key in parrot:
                moved = parrot[key][0] - base[key][0]
                out.append((f"{n} rose: {key} moves {'up' if sign > 0 else 'down'}",
                            f"{moved:+.4g}", moved * sign > 0))
    return out


def identifier_markdown(study: dict[str, Any]) -> str:
    """Three tables, a row per identifier alone, means over seeds: the trained Parrot runs
    and their difference from the untrained models (what training taught each identifier),
    each ± its std over seeds, and the untrained models (the same models in every seed)."""
    names = study["rewards"]
    trained, base = np.asarray(study["mean"]), np.asarray(study["base"])
    parts = [("trained Parrot", trained, np.asarray(study["std"]), ".4g"),
             ("untrained models", base, None, ".4g"),
             ("trained - untrained", trained - base, np.asarray(study["shift_std"]), "+.3g")]
    lines = []
    for title, mean, std, fmt in parts:
        lines += [f"| identifier alone: {title} | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for k in range(len(names)):
            cells = [format(mean[k, j], fmt) + ("" if std is None else f" ± {std[k, j]:.2g}")
                     for j in range(len(names))]
            lines.append(f"| <reward {k + 1}> | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def evidence_markdown(checks: list[tuple[str, str, bool]]) -> str:
    lines = ["| check | measured | holds |", "|---|---|---|"]
    lines += [f"| {claim} | {measured} | {'yes' if ok else 'no'} |"
              for claim, measured, ok in checks]
    return "\n".join(lines) + "\n"


def markdown(summary: dict[str, Any], seeds: Sequence[int], iterations: int) -> str:
    methods = summary["methods"]
    keys = list(next(iter(methods.values())))
    lines = [f"Held-out prompts; mean ± std over seeds {list(seeds)}; {iterations} Parrot "
             "iterations per trained method; hypervolumes from shared references "
             "(pooled over all images; mean over prompts of each prompt's).", "",
             "| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for method, row in methods.items():
        lines.append(f"| {method} | " + " | ".join(f"{row[k][0]:.4g} ± {row[k][1]:.2g}"
                                                    for k in keys) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict[str, Any], names: Sequence[str]) -> np.ndarray:
    """``uint8 [H, W, 3]``: per reward (and each hypervolume) one group of bars, a bar per
    method: its mean change from base, divided by the largest absolute change in the group
    (so each group spans the panel; signs and ranks are what the chart shows)."""
    from PIL import Image, ImageDraw

    methods = summary["methods"]
    keys = list(names) + ["hypervolume", "hypervolume_per_prompt"]
    palette = [(120, 120, 120), (70, 130, 180), (100, 170, 220), (150, 100, 200),
               (60, 160, 90), (230, 160, 40), (200, 90, 90), (200, 30, 30)]
    bar, gap, height, top = 10, 24, 160, 30
    width = len(keys) * (len(methods) * bar + gap) + gap + 150
    image = Image.new("RGB", (width, height + top + 40), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    mid = top + height // 2
    draw.line([(gap // 2, mid), (width - 150, mid)], fill=(0, 0, 0))
    base = methods["base"]
    for g, key in enumerate(keys):
        changes = [methods[m][key][0] - base[key][0] for m in methods]
        scale = max(max(abs(c) for c in changes), 1e-12)
        x0 = gap + g * (len(methods) * bar + gap)
        for i, change in enumerate(changes):
            h = int(round(change / scale * (height // 2 - 4)))
            x = x0 + i * bar
            draw.rectangle([x, min(mid, mid - h), x + bar - 2, max(mid, mid - h)],
                           fill=palette[i % len(palette)])
        draw.text((x0, top + height + 8), key[:14], fill=(0, 0, 0))
    for i, method in enumerate(methods):
        y = top + i * 14
        draw.rectangle([width - 140, y, width - 130, y + 10], fill=palette[i % len(palette)])
        draw.text((width - 125, y - 1), method, fill=(0, 0, 0))
    draw.text((gap, 8), "change from base (each group scaled to its largest change)",
              fill=(0, 0, 0))
    return np.asarray(image)


def _define(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("out", "runs/toy_table", "output folder (resumable)",
                        flag_values=values)
    flags.DEFINE_list("seeds", ["0", "1", "2"], "comma-separated seeds", flag_values=values)
    flags.DEFINE_integer("iterations", 30, "Parrot iterations per run", flag_values=values)
    flags.DEFINE_integer("num_groups", 8, "groups of 8 images per iteration (the comparison in "
                         "docs/toyworld.md used 8; train.py's first run uses 4)",
                         flag_values=values)
    flags.DEFINE_integer("identifier_images", 8, "images per held-out prompt in the identifier "
                         "study", flag_values=values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    try:
        seeds = [int(s) for s in args.seeds]
    except ValueError:
        cli.fail(PROG, f"--seeds {','.join(args.seeds)!r}: comma-separated integers")
    if args.iterations <= 0:
        cli.fail(PROG, "--iterations must be positive")
    out = Path(args.out)
    records: dict[str, list[dict]] = {m: [] for m in METHODS}
    studies = []
    heldout = assets.read_prompt_file(assets.ASSETS, assets.HELDOUT)
    for seed in seeds:
        for method in TRAINED:
            workdir = run_method(method, seed, args.iterations, out, args.num_groups)
            record = json.loads((workdir / "final_eval.json").read_text())
            records[method].append(record)
            if method == "parrot":
                records["base"].append(record)
                records["parrot_no_pcg"].append(no_pcg_evaluation(workdir))
                studies.append(identifier_study(workdir, heldout, args.identifier_images,
                                                seed))
    names = records["parrot"][0]["details"]["rewards"]
    summary = summarise(records, names)
    trained_study = np.stack([t for t, _ in studies])
    base_study = np.stack([b for _, b in studies])
    summary["identifiers"] = {"mean": trained_study.mean(axis=0).tolist(),
                              "std": trained_study.std(axis=0).tolist(),
                              "base": base_study.mean(axis=0).tolist(),
                              "shift_std": (trained_study - base_study).std(axis=0).tolist(),
                              "rewards": names}
    summary.update(seeds=seeds, iterations=args.iterations)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(markdown(summary, seeds, args.iterations))
    (out / "table.png").write_bytes(png_bytes(bar_chart(summary, names)))
    (out / "identifiers.md").write_text(identifier_markdown(summary["identifiers"]))
    (out / "evidence.md").write_text(evidence_markdown(evidence(summary)))
    print("\n".join((out / f).read_text() for f in ("table.md", "identifiers.md", "evidence.md")))
    return summary


if __name__ == "__main__":
    cli.entry_point(main)
