"""A model's structure captured once, and its leaves as the programs receive them (:class:`lrnnx_jax.decoding.CapturedModel`).

``jax.jit`` flattens an nnx module tree at every call; a capture keeps the tree's structure (:class:`Structure`) and
passes only its leaves, with the structure as static data (:class:`ModelLeaves`); :func:`as_model` rebuilds the module
inside the traced program.
"""

from __future__ import annotations

import jax


class Structure:
    """A model's pytree structure as static data of a pytree node: its hash computed once, equality by identity
    first (a captured model's program lookup compares in O(1); two captures of one structure, by their treedefs,
    share their programs)."""

    __slots__ = ("treedef", "_hash")

    def __init__(self, treedef):
        self.treedef, self._hash = treedef, hash(treedef)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, Structure) and self._hash == other._hash
                                 and self.treedef == other.treedef)


@jax.tree_util.register_pytree_node_class
class ModelLeaves:
    """A model as ``jax.jit`` receives it from a :class:`CapturedModel`: its leaves, with its structure as static
    data (:func:`as_model` rebuilds the module inside the traced program)."""

    def __init__(self, structure: Structure, leaves: list):
        self.structure, self.leaves = structure, leaves

    def tree_flatten(self):
        return self.leaves, self.structure

    @classmethod
    def tree_unflatten(cls, structure, leaves):
        return cls(structure, list(leaves))


def as_model(model):
    """The module of a :class:`ModelLeaves` (inside a traced program), or ``model`` as it is."""
    return jax.tree.unflatten(model.structure.treedef, model.leaves) if isinstance(model, ModelLeaves) else model
