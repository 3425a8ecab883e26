"""Sophia inside the trainers people use: Hugging Face ``transformers`` and Lightning.

Each integration is a module of its own, imported explicitly, so that ``import sophia_pytorch``
never loads a framework:

    >>> from sophia_pytorch.integrations.transformers import SophiaTrainer
    >>> from sophia_pytorch.integrations.lightning import SophiaHessianCallback

Both run the same refresh (:mod:`sophia_pytorch.integrations.refresh`): after every optimizer
step whose count is a multiple of ``refresh_every``, one extra forward and backward on the
current batch, with labels drawn from the model (Sophia-G) or a Hessian-vector product
(Sophia-H), gradients averaged over data-parallel ranks, loss scaling undone.
"""
