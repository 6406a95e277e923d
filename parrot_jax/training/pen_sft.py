"""Supervised fine-tuning of the PEN on (prompt -> expansion) pairs (Parrot §4.1, METHOD §1.5).

Teacher-forced cross-entropy ``-sum(log p(ĉ_j | c, ĉ_<j)) / #tokens`` over the expansion tokens
(EOS included) given the templated prompt, with full fine-tuning or LoRA factors on a frozen base.
The loop: build or load the T5 + tokenizer, read the pairs (files, TFDS ArrayRecord or the
synthetic set), hold some out, then jitted steps with the batch sharded over all devices; the
held-out loss at step 0 and every ``eval_every`` steps; orbax checkpoints (``CheckpointManager``:
step, trainable parameters, optimiser state; data position = step) that a rerun in the same
workdir resumes from; ``config.json`` and ``metrics.jsonl`` in the workdir.

Run: ``python -m parrot_jax.training.pen_sft --config configs/pen_sft.py:tiny --workdir W``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parrot_jax import hub, storage
from parrot_jax.data.pipeline import (
    BATCH_KEYS,
    PairEncoder,
    as_pair,
    eval_batches,
    train_dataset,
)
from parrot_jax.data.promptist import DatasetError, read_pairs
from parrot_jax.data.synthetic import synthetic_pairs
from parrot_jax.data.tokenizer import train_t5_tokenizer
from parrot_jax.expansion.scoring import token_log_probs
from parrot_jax.expansion.template import InstructionTemplate
from parrot_jax.models.lora import LoRA, init_lora, merge
from parrot_jax.models.t5 import T5Config, T5ForConditionalGeneration
from parrot_jax.training.metrics import truncate_metrics
from parrot_jax.workdir import CHECKPOINT_DIR, checkpoint_manager, restore_latest, save

FILE_FORMATS = ("jsonl", "tsv", "rephrase")
DATA_FORMATS = ("synthetic", "tfds") + FILE_FORMATS
TOKENIZER_DIR = "tokenizer"

METRICS_FILE = "metrics.jsonl"


# --- data ------------------------------------------------------------------------------------

class Subset:
    """Random-access view of ``source`` at ``indices`` (for held-out splits of one source)."""

    def __init__(self, source: Sequence[Any], indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[int(self.indices[i])]


def _files(spec: str, what: str) -> list[str]:
    """Comma-separated files or globs -> sorted existing files; nothing matching is an error."""
    files = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        matched = sorted(glob.glob(part))
        if not matched:
            raise DatasetError(f"data.{what}: {part!r} matches no file")
        files += matched
    if not files:
        raise DatasetError(f"data.{what} is empty: name the pair files (comma-separated, globs)")
    return files


def load_data(data: ml_collections.ConfigDict, seed: int) -> tuple[Sequence[Any], Sequence[Any]]:
    """(train, held-out) random-access sources from ``config.data``.

    Without an explicit held-out set, ``data.heldout_size`` records drawn (by ``seed``) from the
    training source are held out and removed from it. Empty sets are errors.
    """
    if data.format not in DATA_FORMATS:
        raise ValueError(f"data.format={data.format!r}; one of {', '.join(DATA_FORMATS)}")
    heldout: Sequence[Any] | None = None
    if data.format == "synthetic":
        train = synthetic_pairs(data.synthetic_size, seed=seed)
    elif data.format == "tfds":
        from parrot_jax.data import tfds_promptist

        if data.tfds_manual_dir:
            tfds_promptist.build(data.tfds_manual_dir, data.tfds_data_dir)
        train = tfds_promptist.data_source(data.tfds_data_dir, data.train_split)
        if data.eval_split:
            heldout = tfds_promptist.data_source(data.tfds_data_dir, data.eval_split)
    else:
        kw = dict(format=data.format, prompt_key=data.prompt_key,
                  expansion_key=data.expansion_key)
        train = read_pairs(_files(data.train_files, "train_files"), **kw)
        if data.eval_files:
            heldout = read_pairs(_files(data.eval_files, "eval_files"), **kw)
    if len(train) == 0:
        raise DatasetError("the training set is empty")
    if heldout is None:
        n = data.heldout_size
        if not 0 < n < len(train):
            raise DatasetError(f"data.heldout_size={n} must be in [1, {len(train) - 1}] for "
                               f"{len(train)} training records (or give a held-out set)")
        order = np.random.default_rng(seed).permutation(len(train))
        heldout, train = Subset(train, np.sort(order[:n])), Subset(train, np.sort(order[n:]))
    if len(heldout) == 0:
        raise DatasetError("the held-out set is empty")
    return train, heldout


# --- model -----------------------------------------------------------------------------------

def _dtype(name: str) -> Any:
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype={name!r}; 'float32' or 'bfloat16'")
    return jnp.dtype(name)


def _corpus(source: Sequence[Any], template: InstructionTemplate) -> list[str]:
    pairs = [as_pair(source[i]) for i in range(len(source))]
    return [template.format(p.prompt) for p in pairs] + [p.expansion for p in pairs]


@functools.partial(jax.jit, static_argnums=(1,))
def _init_params(key: jax.Array, module: T5ForConditionalGeneration) -> Any:
    """``module.init_params``, compiled once per architecture in a process."""
    return module.init_params(key)


def load_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
               train: Sequence[Any] | None = None, *, init_params: bool = True
               ) -> tuple[T5ForConditionalGeneration, Any, Any]:
    """``(module, base params, tokenizer)`` named by ``config.model``.

    ``model.name == 'tiny'``: a random T5 of ``model.tiny``'s shape with a tokenizer trained on
    the training pairs (needs ``train``), saved to ``workdir/tokenizer`` and reused from there
    (so a resumed or restored run has the same vocabulary); parameters from ``config.seed``
    (with ``init_params=False`` only their shapes, ``jax.ShapeDtypeStruct``s: enough as a
    restore target). Otherwise a transformers folder or hub id via ``hub.load_t5`` /
    ``hub.load_tokenizer``.
    """
    m = config.model
    dtype = _dtype(m.dtype)
    if m.name == "tiny":
        folder = storage.path(workdir) / TOKENIZER_DIR
        if (folder / "tokenizer.json").is_file():
            tokenizer = hub.load_tokenizer(storage.local_copy(folder))
        else:
            if train is None:
                raise ValueError(f"{folder}: no saved tokenizer and no training data to build one")
            template = InstructionTemplate(config.data.template)
            tokenizer = train_t5_tokenizer(_corpus(train, template), m.tiny.vocab_size)
            if jax.process_index() == 0:
                storage.save_folder(tokenizer.save_pretrained, folder)
        fields = {k: v for k, v in m.tiny.to_dict().items() if k != "vocab_size"}
        t5 = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, **fields)
        module = T5ForConditionalGeneration(t5, dtype=dtype)
        key = jax.random.key(config.seed)
        params = (_init_params if init_params else functools.partial(jax.eval_shape,
                                                                      _init_params))(key, module)
    else:
        module, params = hub.load_t5(m.name, dtype=dtype)
        tokenizer = hub.load_tokenizer(m.tokenizer or m.name)
    c = module.config
    if (tokenizer.pad_token_id, tokenizer.eos_token_id) != (c.pad_token_id, c.eos_token_id):
        raise ValueError(f"tokenizer pad / eos ids {tokenizer.pad_token_id} / "
                         f"{tokenizer.eos_token_id} differ from the model's {c.pad_token_id} / "
                         f"{c.eos_token_id}")
    return module, params, tokenizer


# --- the step --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """``config.optim`` (and, for the cosine schedule, the steps it decays over), hashable: a
    static argument of the jitted step, so runs with the same settings and shapes in one
    process (a resumed run, a notebook) share one compilation."""

    learning_rate: float
    schedule: str
    warmup_steps: int
    weight_decay: float
    b1: float
    b2: float
    grad_clip: float
    decay_steps: int  # cosine: steps to decay over (the run's num_train_steps); constant: 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> OptimSettings:
        o = config.optim
        if o.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule={o.schedule!r}; 'constant' or 'cosine'")
        return cls(float(o.learning_rate), o.schedule, int(o.warmup_steps),
                   float(o.weight_decay), float(o.b1), float(o.b2), float(o.grad_clip),
                   int(config.num_train_steps) if o.schedule == "cosine" else 0)


def make_optimizer(o: OptimSettings) -> optax.GradientTransformation:
    """AdamW with linear warmup then a constant or cosine-decayed rate (to 0 at the last step),
    after global-norm clipping."""
    if o.schedule == "cosine":
        rate = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps,
                                                  max(o.decay_steps, o.warmup_steps + 1))
    else:
        rate = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
                                     optax.constant_schedule(o.learning_rate)],
                                    [o.warmup_steps])
    return optax.chain(optax.clip_by_global_norm(o.grad_clip),
                       optax.adamw(rate, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def full_params(base: Any, trainable: Any) -> Any:
    """The parameters the model runs with: ``trainable`` itself, or ``base`` merged with LoRA."""
    return merge(base, trainable) if isinstance(trainable, LoRA) else trainable


def nll_and_count(module: T5ForConditionalGeneration, params: Any,
                  batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of the target tokens and their count (float32 scalars)."""
    log_probs = token_log_probs(module, params, batch["input_ids"], batch["attention_mask"],
                                batch["targets"], batch["target_mask"])
    return -jnp.sum(log_probs), jnp.sum(batch["target_mask"]).astype(jnp.float32)


def _loss(trainable: Any, base: Any, batch: dict[str, jax.Array],
          module: T5ForConditionalGeneration) -> jax.Array:
    nll, count = nll_and_count(module, full_params(base, trainable), batch)
    return nll / jnp.maximum(count, 1.0)


@functools.partial(jax.jit, static_argnames=("module", "optim"), donate_argnums=(0,))
def train_step(state: dict[str, Any], base: Any, batch: dict[str, jax.Array], *,
               module: T5ForConditionalGeneration,
               optim: OptimSettings) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One AdamW step on ``-sum(token_log_probs * mask) / sum(mask)`` over the global batch
    (a per-token mean). ``state``: ``step``, ``trainable`` (params or ``LoRA``), ``opt_state``;
    ``base``: frozen params under LoRA, else None. Batch arrays ``[B, S]`` / ``[B, T]``."""
    optimizer = make_optimizer(optim)
    loss, grads = jax.value_and_grad(_loss)(state["trainable"], base, batch, module)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads)}
    return {"step": state["step"] + 1, "trainable": trainable, "opt_state": opt_state}, metrics


@functools.partial(jax.jit, static_argnames=("module",))
def eval_step(base: Any, trainable: Any, batch: dict[str, jax.Array], *,
              module: T5ForConditionalGeneration) -> tuple[jax.Array, jax.Array]:
    """Held-out (summed NLL, token count) of one batch."""
    return nll_and_count(module, full_params(base, trainable), batch)


def data_mesh() -> Mesh:
    """All devices on one ``data`` axis: batches split over it, parameters replicated."""
    return Mesh(np.array(jax.devices()), ("data",))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> global arrays split over the ``data`` axis (leading dimension)."""
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    return {k: jax.make_array_from_process_local_data(sharding, batch[k]) for k in BATCH_KEYS}


def heldout_loss(module: T5ForConditionalGeneration, base: Any, trainable: Any,
                 heldout: Sequence[Any], encoder: PairEncoder, batch_size: int,
                 mesh: Mesh) -> float:
    """Token-mean NLL over every held-out record (exact: padded rows carry no tokens)."""
    nll, count = 0.0, 0.0
    for batch in eval_batches(heldout, encoder, batch_size, process_index=jax.process_index(),
                              process_count=jax.process_count()):
        n, c = eval_step(base, trainable, shard_batch(batch, mesh), module=module)
        nll, count = nll + float(n), count + float(c)
    return nll / count


# --- checkpoints and metrics -----------------------------------------------------------------

def _write_metrics(workdir: epath.Path, record: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        storage.append(workdir / METRICS_FILE, json.dumps(record) + "\n")


def _initial_trainable(config: ml_collections.ConfigDict, params: Any) -> tuple[Any, Any]:
    """``(trainable, base)``: full parameters and no base, or fresh LoRA factors on ``params``."""
    if config.finetune == "full":
        return params, None
    if config.finetune == "lora":
        lora = init_lora(jax.random.fold_in(jax.random.key(config.seed), 1), params,
                         rank=config.lora.rank, alpha=config.lora.alpha,
                         targets=config.lora.targets)
        return lora, params
    raise ValueError(f"finetune={config.finetune!r}; 'full' or 'lora'")


def restore(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
            step: int | None = None) -> tuple[T5ForConditionalGeneration, Any, Any, int]:
    """``(module, params, tokenizer, step)`` from a finished or running SFT workdir: the base
    model rebuilt from ``config`` and the checkpointed trainable parameters applied (LoRA merged
    into the base). ``step`` None: the latest checkpoint."""
    module, params, tokenizer = load_model(config, workdir, init_params=config.finetune != "full")
    trainable, base = _initial_trainable(config, params)
    optimizer = make_optimizer(OptimSettings.from_config(config))
    target = {"step": jnp.zeros((), jnp.int32), "trainable": trainable,
              "opt_state": optimizer.init(trainable)}
    # Shapes replicated on this process's devices: the checkpoint's own shardings name the
    # devices of the run that wrote it (several processes, another slice).
    replicated = NamedSharding(data_mesh(), PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          target)
    with checkpoint_manager(workdir, read_only=True) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{storage.path(workdir) / CHECKPOINT_DIR}: no checkpoint")
        state = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
    return module, full_params(base, state["trainable"]), tokenizer, int(state["step"])


# --- the loop --------------------------------------------------------------------------------

def _check_sizes(config: ml_collections.ConfigDict, devices: int) -> None:
    for name in ("batch_size", "eval_batch_size"):
        size = config[name]
        if size <= 0 or size % devices:
            raise ValueError(f"{name}={size} must be a positive multiple of the {devices} "
                             "devices (it is the global batch, split over all of them)")
    for name in ("num_train_steps", "log_every", "eval_every", "checkpoint_every"):
        if config[name] <= 0:
            raise ValueError(f"{name}={config[name]} must be positive")


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> dict[str, float]:
    """Run (or resume) SFT as ``config`` says, writing to ``workdir``; returns the last metrics
    (``step``, ``train_loss``, ``eval_loss``, ``initial_eval_loss`` when step 0 ran here)."""
    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    devices = jax.devices()
    _check_sizes(config, len(devices))
    logging.info("process %d of %d, %d devices: %s", jax.process_index(), jax.process_count(),
                 len(devices), devices[0].platform)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    logging.info("Loading data (%s)", config.data.format)
    train, heldout = load_data(config.data, config.seed)
    logging.info("Loading model (%s)", config.model.name)
    module, params, tokenizer = load_model(config, workdir, train)
    template = InstructionTemplate(config.data.template)
    encoder = PairEncoder(tokenizer, config.data.max_input_length, config.data.max_target_length,
                          template)
    logging.info("Checking token lengths of %d train / %d held-out records", len(train),
                 len(heldout))
    encoder.check_lengths(train)
    encoder.check_lengths(heldout)
    dataset = train_dataset(train, encoder, config.batch_size, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())

    mesh = data_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    optim = OptimSettings.from_config(config)
    trainable, base = _initial_trainable(config, params)
    state = jax.device_put({"step": jnp.zeros((), jnp.int32), "trainable": trainable,
                            "opt_state": make_optimizer(optim).init(trainable)}, replicated)
    base = jax.device_put(base, replicated)

    def evaluate(trainable) -> float:
        return heldout_loss(module, base, trainable, heldout, encoder, config.eval_batch_size,
                            mesh)

    manager = checkpoint_manager(workdir, config.max_to_keep)
    result: dict[str, float] = {}
    state, latest = restore_latest(manager, state, unit="step")
    if jax.process_index() == 0:  # records after the checkpoint are written again
        truncate_metrics(workdir, -1 if latest is None else latest)
    if latest is not None:
        logging.info("Resuming from the checkpoint at step %d", latest)
    else:
        result["initial_eval_loss"] = evaluate(state["trainable"])
        _write_metrics(workdir, {"step": 0, "eval_loss": result["initial_eval_loss"]})
        logging.info("step 0: held-out loss %.4f", result["initial_eval_loss"])

    step = int(state["step"])
    logging.info("Compiling and training from step %d to %d (global batch %d)", step,
                 config.num_train_steps, config.batch_size)
    timer_start, timer_steps = None, 0
    while step < config.num_train_steps:
        state, metrics = train_step(state, base, shard_batch(dataset[step], mesh), module=module,
                                    optim=optim)
        step += 1
        if timer_start is None:  # the first step includes compilation: time from its end
            jax.block_until_ready(state["step"])
            timer_start = time.perf_counter()
        else:
            timer_steps += 1
        record: dict[str, float] = {}
        if step % config.log_every == 0 or step == config.num_train_steps:
            record.update({k: float(v) for k, v in metrics.items()})
            if not math.isfinite(record["train_loss"]):
                raise FloatingPointError(f"step {step}: train loss is {record['train_loss']}")
            if timer_steps:
                rate = timer_steps * config.batch_size / (time.perf_counter() - timer_start)
                record["examples_per_s"] = rate
        if step % config.eval_every == 0 or step == config.num_train_steps:
            record["eval_loss"] = evaluate(state["trainable"])
        if record:
            _write_metrics(workdir, {"step": step, **record})
            logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in record.items()))
            result.update(record)
        if step % config.checkpoint_every == 0 or step == config.num_train_steps:
            save(manager, step, state)
    manager.wait_until_finished()
    manager.close()
    result["step"] = step
    return result


PROG = "python -m parrot_jax.training.pen_sft"


def _define(values: Any, argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    from parrot_jax import cli

    config_flags.DEFINE_config_file("config", None, "SFT config file (path.py[:arg])",
                                    flag_values=values, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "where checkpoints and metrics go", flag_values=values)
    cli.define_distributed_flags(values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m parrot_jax.training.pen_sft --config configs/pen_sft.py[:arg] --workdir W``
    (``parrot_jax.cli`` flags)."""
    from parrot_jax import cli, parallel

    args = cli.parse(_define, argv, prog=PROG, doc=__doc__)
    if args.config is None or not args.workdir:
        cli.fail(PROG, "--config and --workdir are required")
    cli.check_workdir(PROG, args.workdir)
    distributed = bool(args.config.get("distributed", False))
    launch = cli.distributed_launch(PROG, args, distributed)
    try:  # before anything touches the devices
        parallel.initialize_distributed(distributed, **launch)
    except parallel.LaunchError as e:
        cli.fail(PROG, f"--coordinator_address: {e}")
    from parrot_jax.workdir import CheckpointError

    try:
        return train_and_evaluate(args.config, args.workdir)
    except (DatasetError, FileNotFoundError) as e:  # bad input
        cli.fail(PROG, str(e))
    except (FloatingPointError, CheckpointError) as e:  # the run cannot go on
        cli.halt(PROG, str(e))


if __name__ == "__main__":
    from parrot_jax import cli

    cli.entry_point(main)
