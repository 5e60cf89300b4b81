"""The block engine, below every stage that runs a model: scoped hooks that capture a block's
inputs and call arguments (`hooks`), re-running blocks from them with a unit removed or changed
and summing KL at the head a chunk at a time (`replay`), the KL and agreement of logits with the
base model's (`divergence`), and KL for many variants at once with the head applied a slice of
vocabulary rows at a time (`sliced_kl`). Profile, quantize, plan, prune and evaluate all run
blocks through these; loading and unloading a block's weights lives with the model
(`models.streaming`).
"""
