"""The end-of-training comparison: base vs trained models on held-out prompts.

``final_evaluation(config, workdir)`` runs when ``config.final_eval.prompts`` names a prompt
file: both models generate ``num_images`` images per prompt the way the paper infers (PEN
expansion, the reward identifiers, original-prompt-centred guidance; ``parrot_jax.evaluate``'s
code, paired noise), every reward scores them, and, with ``final_eval.oracle``, the toy world's
pixel oracle measures them too. Both hypervolumes are ``parrot_jax.evaluate``'s: of all images'
reward vectors, and the mean over prompts of each prompt's. Writes ``workdir/final_eval.json``::

    {"base": {<reward>: mean, ..., "hypervolume": hv, "hypervolume_per_prompt": hv_p,
              "oracle/<metric>": mean, ...},
     "trained": {...}, "details": {stds, the hypervolume reference, prompts, settings,
                                   each model's greedy expansion of each prompt and how many
                                   differ, every image's reward vector}}

and returns it; ``table`` renders it for the console.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from parrot_jax.data.promptist import read_prompts
from parrot_jax.expansion import parse_identifiers
from parrot_jax.training.precision import under_matmul_precision

FINAL_EVAL_FILE = "final_eval.json"


@under_matmul_precision()
def final_evaluation(config: ml_collections.ConfigDict, workdir: str | Path, *,
                     filename: str = FINAL_EVAL_FILE) -> dict[str, Any]:
    """Score the untrained and the latest checkpoint's models (module docstring); the record
    goes to ``workdir/filename``. Runs under the run's ``matmul_precision``."""
    from parrot_jax import evaluate
    from parrot_jax.sample import Samples, load_runs

    fe = config.final_eval
    prompts = read_prompts(fe.prompts)
    trained, base = load_runs(workdir, base=True)
    rewards = trained.models.rewards
    names = list(rewards.names)
    ids = [] if fe.identifiers == "none" else parse_identifiers(fe.identifiers, len(names))
    oracle = None
    if fe.oracle:
        from parrot_jax.toyworld.oracle import oracle_metrics as oracle
    values, measured, expansions = {}, {}, {}
    try:
        for label, loaded in (("base", base), ("trained", trained)):
            samples: list[Samples] = []
            logging.info("Final evaluation: %s models, %d prompts x %d images", label,
                         len(prompts), fe.num_images)
            values[label] = evaluate.score(
                loaded, prompts, identifiers=ids, w1=fe.w1, w2=fe.w2, expand_prompt=True,
                greedy=True, num_images=fe.num_images, seed=fe.seed,
                batch_prompts=fe.batch_prompts, on_samples=samples.append)
            expansions[label] = [e for s in samples for e in s.expansions]
            if oracle is not None:
                per_image = [p for p in prompts for _ in range(fe.num_images)]
                metrics = oracle(np.concatenate([s.images for s in samples]), per_image)
                measured[label] = {f"oracle/{k}": float(np.mean(v)) for k, v in metrics.items()}
    finally:
        rewards.close()
    changed = sum(b != t for b, t in zip(expansions["base"], expansions["trained"]))
    logging.info("Final evaluation: the trained PEN's greedy expansion differs from the "
                 "untrained one on %d of %d held-out prompts", changed, len(prompts))
    results, reference = evaluate.with_hypervolumes(values, names, num_images=fe.num_images)
    record: dict[str, Any] = {}
    for label in ("base", "trained"):
        record[label] = {n: results[label][n]["mean"] for n in names}
        for key in ("hypervolume", "hypervolume_per_prompt"):
            record[label][key] = results[label][key]
        record[label].update(measured.get(label, {}))
    record["details"] = {
        "std": {label: {n: results[label][n]["std"] for n in names} for label in values},
        "hypervolume_reference": reference, "rewards": names, "prompts": str(fe.prompts),
        "num_prompts": len(prompts), "num_images": fe.num_images, "seed": fe.seed,
        "identifiers": [i + 1 for i in ids], "guidance": {"w1": fe.w1, "w2": fe.w2},
        "trained_step": trained.step,
        # Each model's greedy PEN expansion of each prompt: whether RL changed what the PEN
        # writes (the rewards alone cannot tell a PEN that moved from one that did not).
        "expansions": expansions, "expansions_changed": changed,
        # Every image's reward vector (rows prompt-major): fronts can be compared across runs.
        "values": {label: np.round(np.asarray(v, np.float64), 6).tolist()
                   for label, v in values.items()},
    }
    (Path(workdir) / filename).write_text(json.dumps(record, indent=2) + "\n")
    return record


def table(record: dict[str, Any]) -> str:
    """``final_eval.json`` as a markdown table: one row per number, base | trained | change."""
    lines = ["| metric | base | trained | change |", "|---|---|---|---|"]
    for key in record["base"]:
        b, t = record["base"][key], record["trained"][key]
        lines.append(f"| {key} | {b:.4f} | {t:.4f} | {t - b:+.4f} |")
    return "\n".join(lines)
