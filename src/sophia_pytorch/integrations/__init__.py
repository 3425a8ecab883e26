"""Sophia inside the trainers people use: Hugging Face ``transformers`` and Lightning.

Each integration is a module of its own, imported explicitly, so that ``import sophia_pytorch``
never loads a framework:

    >>> from sophia_pytorch.integrations.transformers import SophiaTrainer
    >>> from sophia_pytorch.integrations.lightning import SophiaHessianCallback

Both run the library's one refresh (:mod:`sophia_pytorch.refresh`, the trainer's GradScaler
and autocast as its keywords): after every optimizer step whose count is a
multiple of ``refresh_every``, one extra forward and backward on the current batch, with
targets drawn from the model's own likelihood (Sophia-G: softmax, Gaussian or Bernoulli, as
the model's loss is) or a Hessian-vector product (Sophia-H), gradients averaged over
data-parallel ranks, loss scaling undone.
"""
