"""The toy world: a small procedural image world with its own small models (docs/toyworld.md).

Images are 32x32 RGB, one shape on a plain background, described by eight discrete attributes.
Everything Parrot needs at paper scale exists here in miniature, so a run on a laptop CPU shows
real, measurable movement.

The world itself (pure numpy, no models):

- ``world``: the attributes and their values; sampling scenes (one int index per attribute).
- ``render``: scenes -> images ``[N, H, W, 3]`` in [0, 1], vectorised, anti-aliased.
- ``captions``: the prompt grammar: user prompts, training captions, the biased "prompt
  engineer" that writes the PEN's targets, ``parse`` (the grammar's inverse) and the vocabulary.
- ``labels``: attribute-derived labels that train the learned reward heads (aesthetics,
  sentiment, prompt-conditioned preference), built to conflict with each other.
- ``oracle``: metrics from pixels only (contrast, saturation, hue error, shape IoU, ...) that
  tell true improvement from reward hacking of the learned heads.

The models, trained by the project's own code in the same architectures as the real ones:

- ``clip_train``: the CLIP-style dual encoder (its text tower conditions the UNet).
- ``heads_train``: reward heads on the toy CLIP image embedding.
- ``pen_train``: the tiny T5 prompt-expansion network (user prompt -> engineered prompt).
- ``vae_train``: the VAE, 32x32x3 <-> 8x8x4.
- ``unet_train``: the latent-diffusion UNet on captions naming random attribute subsets.
- ``build``: runs all of the above, seeded, and writes the shipped weights.
"""
