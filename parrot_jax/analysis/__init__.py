"""Research diagnostics over training workdirs, above the core (nothing in the core imports them).

Each is a command line (``python -m parrot_jax.analysis.<name> --help``):

- ``conflict``: where the rewards disagree, within groups (what Parrot's update can trade) and
  between them;
- ``transfer``: whether a policy-gradient step taken for one identifier moves only that
  identifier's images;
- ``modifiers``: how much each modifier the PEN writes moves each reward (toy world);
- ``table``: the paper's comparison of methods in the toy world, over seeds.

``as_trained`` renders a run's images conditioned as training conditions them, for the first
three.
"""
