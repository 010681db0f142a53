"""Task constructors: wrap a model and its data as a ``stride_jax.task.Task``.

- ``classifier(model, train=(x, y), queries=(xq, yq), retrain=...)``: any Flax NNX module
  that maps a batch of features to logits (a user's own CNN, the library's MLP...).
- ``decoder(model, train=blocks, queries=blocks, recipe=..., params0=...)``: the NNX
  transformer (``models.transformer``), built here, from a Hugging Face config or GGUF file.
- ``mlp_task(...)``: the library's MLP with its recipe (what the benchmark job builds).

Every constructor checks its parts against each other before any work and raises
``TaskError`` (a ``ValueError``) naming the part that does not fit.
"""

from stride_jax.task import KINDS, Task, TaskError
from stride_jax.tasks.build import adamw_recipe, classifier, decoder, mlp_task
from stride_jax.tasks.classifier_task import ClassifierTask


def __getattr__(name):  # the decoder task loads the transformer stack only when used
    if name == "DecoderTask":
        from stride_jax.tasks.decoder_task import DecoderTask

        return DecoderTask
    raise AttributeError(name)


__all__ = [
    "KINDS",
    "ClassifierTask",
    "DecoderTask",
    "Task",
    "TaskError",
    "adamw_recipe",
    "classifier",
    "decoder",
    "mlp_task",
]
