"""The end-of-training comparison: base vs trained models on held-out prompts.

``final_evaluation`` runs when ``config.final_eval.prompts`` names a prompt file: both policies
generate ``num_images`` images per prompt the way the paper infers (PEN expansion, the reward
identifiers, original-prompt-centred guidance; ``scoring.score``, paired noise), every reward
scores them, and the image metrics ``final_eval.image_metrics`` names (registered plugins, e.g.
the toy world's pixel oracle) measure them too. Both hypervolumes are ``scoring``'s: of all
images' reward vectors, and the mean over prompts of each prompt's. Writes
``workdir/final_eval.json``::

    {"base": {<reward>: mean, ..., "hypervolume": hv, "hypervolume_per_prompt": hv_p,
              "<metric>": mean, ...},
     "trained": {...}, "details": {stds, the hypervolume reference, prompts, settings,
                                   each model's greedy expansion of each prompt and how many
                                   differ, every image's reward vector}}

and returns it; ``table`` renders it for the console. ``final_evaluation_of`` does the same for
a finished workdir (its config.json, untrained models and latest checkpoint). The prompt file
is checked whole first (``check_prompt_lengths``: the PEN's input and the text encoder's
context); a prompt that does not fit raises ``DatasetError`` naming its ``file:line``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from absl import logging

from parrot_jax import plugins, policy, scoring, storage
from parrot_jax.data.prompts import check_prompt_lengths, inference_limits, read_prompt_list
from parrot_jax.policy import Policy, Samples
from parrot_jax.precision import matmul_precision
from parrot_jax.training.settings import FinalEval, final_eval

FINAL_EVAL_FILE = "final_eval.json"


def final_evaluation(fe: FinalEval, base: Policy, trained: Policy, workdir: str | os.PathLike, *,
                     filename: str = FINAL_EVAL_FILE, w1: float | None = None
                     ) -> dict[str, Any]:
    """Score the ``base`` and ``trained`` policies (module docstring); the record goes to
    ``workdir/filename``. ``w1`` overrides the original prompt's guidance weight (0: plain
    guidance on the identified expansion). Runs under the run's ``matmul_precision``."""
    with matmul_precision(trained.config):
        return _evaluate(fe, base, trained, workdir, filename, w1)


def _evaluate(fe: FinalEval, base: Policy, trained: Policy, workdir: str | os.PathLike,
              filename: str, w1: float | None) -> dict[str, Any]:
    prompts = read_prompt_list(fe.prompts)
    # The whole file, before either model samples: a prompt that does not fit fails here,
    # naming its line, not after the base model's chunks (training checked it at set-up too).
    check_prompt_lengths(prompts, inference_limits(trained.models,
                                                   trained.config.data.max_prompt_length))
    names = list(trained.models.rewards.names)
    metrics = plugins.image_metrics(fe.image_metrics)
    w1 = fe.w1 if w1 is None else w1
    values, measured, expansions = {}, {}, {}
    for label, model in (("base", base), ("trained", trained)):
        samples: list[Samples] = []
        logging.info("Final evaluation: %s models, %d prompts x %d images", label,
                     len(prompts), fe.num_images)
        values[label] = scoring.score(
            model, prompts, identifiers=fe.identifiers, w1=w1, w2=fe.w2, expand_prompt=True,
            greedy=True, num_images=fe.num_images, seed=fe.seed,
            batch_prompts=fe.batch_prompts, on_samples=samples.append)
        expansions[label] = [e for s in samples for e in s.expansions]
        measured[label] = {}
        per_image = [p for p in prompts for _ in range(fe.num_images)]
        images = np.concatenate([s.images for s in samples]) if metrics else None
        for measure in metrics:
            for name, v in measure(images, per_image).items():
                measured[label][name] = float(np.mean(v))
    changed = sum(b != t for b, t in zip(expansions["base"], expansions["trained"]))
    logging.info("Final evaluation: the trained PEN's greedy expansion differs from the "
                 "untrained one on %d of %d held-out prompts", changed, len(prompts))
    results, reference = scoring.with_hypervolumes(values, names, num_images=fe.num_images)
    record: dict[str, Any] = {}
    for label in ("base", "trained"):
        record[label] = {n: results[label][n]["mean"] for n in names}
        for key in ("hypervolume", "hypervolume_per_prompt"):
            record[label][key] = results[label][key]
        record[label].update(measured[label])
    record["details"] = {
        "std": {label: {n: results[label][n]["std"] for n in names} for label in values},
        "hypervolume_reference": reference, "rewards": names, "prompts": str(fe.prompts),
        "num_prompts": len(prompts), "num_images": fe.num_images, "seed": fe.seed,
        "identifiers": [i + 1 for i in fe.identifiers], "guidance": {"w1": w1, "w2": fe.w2},
        "trained_step": trained.step,
        # Each model's greedy PEN expansion of each prompt: whether RL changed what the PEN
        # writes (the rewards alone cannot tell a PEN that moved from one that did not).
        "expansions": expansions, "expansions_changed": changed,
        # Every image's reward vector (rows prompt-major): fronts can be compared across runs.
        "values": {label: np.round(np.asarray(v, np.float64), 6).tolist()
                   for label, v in values.items()},
    }
    (storage.path(workdir) / filename).write_text(json.dumps(record, indent=2) + "\n")
    return record


def final_evaluation_of(workdir: str | os.PathLike, *, filename: str = FINAL_EVAL_FILE,
                        w1: float | None = None) -> dict[str, Any]:
    """``final_evaluation`` of a finished workdir: its ``config.final_eval``, its untrained
    models and its latest checkpoint, loaded once."""
    trained, base = policy.load(workdir, base=True)
    try:
        fe = final_eval(trained.config.final_eval, len(trained.models.rewards.names))
        if fe is None:
            raise policy.RunError(f"{workdir}: config.final_eval.prompts is not set")
        return final_evaluation(fe, base, trained, workdir, filename=filename, w1=w1)
    finally:
        trained.models.rewards.close()


def table(record: dict[str, Any]) -> str:
    """``final_eval.json`` as a markdown table: one row per number, base | trained | change."""
    lines = ["| metric | base | trained | change |", "|---|---|---|---|"]
    for key in record["base"]:
        b, t = record["base"][key], record["trained"][key]
        lines.append(f"| {key} | {b:.4f} | {t:.4f} | {t - b:+.4f} |")
    return "\n".join(lines)
