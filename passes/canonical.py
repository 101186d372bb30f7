"""The form the passes match, entered and left around every rewrite: ``with rewriting(model):``.

Some graphs say the same math in a form the matchers do not walk: ONNX Runtime's Skip norms keep the
residual Add inside the norm (ORT GenAI's builder, ORT's transformer optimizer), and legacy exports
keep parameter arithmetic such as Gemma's ``1 + w``. :func:`canonicalize` rewrites both in place
(:class:`~.skip_norms.SplitSkipNormsPass`, :class:`~.constant_folding.FoldSmallConstantsPass`).

* A **rewrite** (every pass that changes a model: attention or FFN removal, fusion, a depth plan,
  the repair, the file pipeline) runs inside :func:`rewriting`: canonical form on entry, and on a
  successful exit the conventions the input had come back — Skip norms restored where they still
  apply, fused groups of 4-bit layers written as 4-bit ``MatMulNBits`` again. Sections nest (a
  depth plan runs three passes; the file pipeline runs a pass and the repair): only the outermost
  one enters and leaves, so the library, the Olive pass and the CLI write the same graph.
* **Reading** a model (:func:`~.blocks.find_blocks` outside a rewrite: ``inspect``, planning,
  exporting a checkpoint) changes nothing: when the graph is not canonical, the walk runs on a clone
  (graph structure copied, weights shared).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import onnx_ir as ir

from ffnfusion.passes.constant_folding import FoldSmallConstantsPass
from ffnfusion.passes.nbits import RequantizeFusedPass
from ffnfusion.passes.skip_norms import RestoreSkipNormsPass, SplitSkipNormsPass, has_skip_norms

# Models (by id) inside a rewrite in this context: nested sections leave the outermost's work alone.
_REWRITING: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("ffnfusion_rewriting", default=frozenset())


def canonicalize(model: ir.Model) -> bool:
    """Split Skip norms and fold small constant arithmetic, in place (the same math). Returns
    whether anything changed."""
    split = SplitSkipNormsPass()(model).modified if has_skip_norms(model) else False
    folded = FoldSmallConstantsPass()(model).modified
    return split or folded


def restore_conventions(model: ir.Model, had_skip_norms: bool) -> None:
    """What a rewrite leaves for the runtimes: Skip norms back where they apply (if the input had
    them) and fused 4-bit groups quantised again (a no-op for float models)."""
    if had_skip_norms:
        RestoreSkipNormsPass()(model)
    RequantizeFusedPass()(model)


def in_rewrite(model: ir.Model) -> bool:
    return id(model) in _REWRITING.get()


@contextlib.contextmanager
def rewriting(model: ir.Model) -> Iterator[ir.Model]:
    """Canonical form for the body; the input's conventions back after it (outermost section only;
    after an error the model is left as the error left it)."""
    if in_rewrite(model):
        yield model
        return
    had_skip_norms = has_skip_norms(model)
    canonicalize(model)
    token = _REWRITING.set(_REWRITING.get() | {id(model)})
    try:
        yield model
    finally:
        _REWRITING.reset(token)
    restore_conventions(model, had_skip_norms)


def canonical_view(model: ir.Model) -> ir.Model:
    """``model`` itself when it is canonical or inside a rewrite; otherwise a canonical clone (graph
    structure copied, weight tensors shared), so that reading never changes the input."""
    if in_rewrite(model):
        return model
    clone = model.clone()
    return clone if canonicalize(clone) else model


class RewritePass(ir.passes.InPlacePass):
    """An in-place pass whose :meth:`rewrite` sees the canonical form and whose result has the
    input's conventions back (a section of :func:`rewriting`)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with rewriting(model):
            return self.rewrite(model)

    def rewrite(self, model: ir.Model) -> ir.passes.PassResult:
        raise NotImplementedError
