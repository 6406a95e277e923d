"""Supervised fine-tuning of the prompt expansion network (T5) on Promptist-format pairs.

Variants (``--config configs/pen_sft.py:ARG``):
  (none)  FLAN-T5-base (hub id ``google/flan-t5-base``), LoRA, pairs from JSONL files: set
          ``--config.data.train_files``.
  full    the same with full fine-tuning.
  tfds    pairs from the ``promptist_pairs`` TFDS builder: files placed in
          ``--config.data.tfds_manual_dir`` are prepared once into ``data.tfds_data_dir``.
  tiny    a tiny random T5 and a tokenizer trained offline on the synthetic pairs: runs on a
          laptop CPU in about a minute, downloads nothing.
Batch sizes are global (split over all devices; must divide by the device count).
"""

import ml_collections

from parrot_jax.expansion.template import DEFAULT_TEMPLATE


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "default"
    if arg not in ("default", "full", "tfds", "tiny"):
        raise ValueError(f"unknown pen_sft variant {arg!r}: default, full, tfds or tiny")
    c = ml_collections.ConfigDict()
    c.seed = 0  # PRNG seed: tiny-model init, LoRA init, held-out draw, data shuffle
    c.distributed = False  # call jax.distributed.initialize() first (several processes)

    c.model = ml_collections.ConfigDict()
    c.model.name = "google/flan-t5-base"  # transformers T5 folder or hub id; 'tiny': random T5
    c.model.tokenizer = ""  # tokenizer folder or hub id; '' = model.name
    c.model.dtype = "float32"  # activation dtype: 'float32' or 'bfloat16' (params stay float32)
    c.model.tiny = ml_collections.ConfigDict(dict(  # shape of the random T5 when name == 'tiny'
        vocab_size=256,  # tokenizer pieces to train (the model gets the trained vocabulary size)
        d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,  # FLAN-T5's layout
    ))

    c.data = ml_collections.ConfigDict()
    c.data.format = "jsonl"  # 'jsonl', 'tsv', 'rephrase' (Promptist lines), 'tfds', 'synthetic'
    c.data.train_files = ""  # comma-separated pair files or globs (jsonl / tsv / rephrase)
    c.data.eval_files = ""  # held-out pair files; '' = hold out data.heldout_size train records
    c.data.prompt_key = "prompt"  # JSONL field of the user prompt
    c.data.expansion_key = "expansion"  # JSONL field of the expanded prompt
    c.data.tfds_manual_dir = ""  # tfds: folder with train.jsonl|tsv|rephrase.txt (+ validation.*)
    c.data.tfds_data_dir = ""  # tfds: where the ArrayRecord dataset is prepared / read
    c.data.train_split = "train"  # tfds: training split
    c.data.eval_split = ""  # tfds: held-out split ('validation'); '' = hold out from train
    c.data.synthetic_size = 2048  # synthetic: number of generated pairs
    c.data.heldout_size = 512  # records held out from train when no held-out set is given
    c.data.max_input_length = 96  # tokens of the templated prompt (longer records: an error)
    c.data.max_target_length = 77  # tokens of the expansion incl. EOS (paper: 77, CLIP's context)
    c.data.template = DEFAULT_TEMPLATE  # PEN instruction; '{prompt}' is the user prompt

    c.finetune = "lora"  # 'lora' (factors on a frozen base) or 'full'
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 16  # LoRA rank r
    c.lora.alpha = 16.0  # LoRA scale numerator: delta W = (alpha / r) A B
    c.lora.targets = r"(SelfAttention|EncDecAttention)/[qkvo]/kernel$"  # regex over kernel paths

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-4  # peak AdamW rate
    c.optim.schedule = "cosine"  # after warmup: 'cosine' decay to 0 at the last step, 'constant'
    c.optim.warmup_steps = 500  # linear warmup from 0, in steps
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay
    c.optim.b1 = 0.9  # Adam beta1
    c.optim.b2 = 0.999  # Adam beta2
    c.optim.grad_clip = 1.0  # clip gradients to this global norm

    c.batch_size = 64  # global training batch (pairs per step)
    c.eval_batch_size = 64  # global held-out batch
    c.num_train_steps = 20_000  # optimiser steps in total (a resumed run continues to this)
    c.log_every = 50  # steps between train metrics in metrics.jsonl
    c.eval_every = 1000  # steps between held-out losses (also at step 0 and at the end)
    c.checkpoint_every = 1000  # steps between orbax checkpoints (also at the end)
    c.max_to_keep = 3  # checkpoints kept

    if arg == "full":
        c.finetune = "full"
        c.optim.learning_rate = 3e-5
    elif arg == "tfds":
        c.data.format = "tfds"
        c.data.eval_split = "validation"
    elif arg == "tiny":
        c.model.name = "tiny"
        c.data.format = "synthetic"
        c.data.heldout_size = 128
        c.data.max_input_length = 48
        c.data.max_target_length = 32
        c.finetune = "full"
        c.optim.learning_rate = 3e-3
        c.optim.schedule = "constant"
        c.optim.warmup_steps = 10
        c.batch_size = 32
        c.eval_batch_size = 64
        c.num_train_steps = 300
        c.log_every = 10
        c.eval_every = 100
        c.checkpoint_every = 100
        c.max_to_keep = 2
    return c
