"""H-GKD (Sec. 3.2.2): L = L_mse + lambda * L_sim against a FIFO queue of teacher embeddings."""
from __future__ import annotations

from torch import Tensor

from ..losses import masked_mse, pooled_embedding, similarity_loss
from ..outputs import NetOutputs
from ..queue import MemoryQueue
from .base import DistillMethod, MethodContext, register_method, with_total


@register_method("hgkd")
class HGKD(DistillMethod):
    """Feature distillation from cached MIM tokens; the queue is this method's state.

    The batch's teacher embeddings are enqueued first, then p_t, p_s are compared over the
    queue (paper order). ``similarity=False`` is Table 5's "w/o similarity". Terms are
    logged weighted: ``sim`` is lambda * L_sim.
    """

    supervised = False
    teacher_needs = frozenset({"tokens", "valid", "pooled"})
    config_options = ("similarity", "queue_size", "tau", "sim_weight")  # --no-similarity, --queue-size, ...

    def __init__(self, ctx: MethodContext, similarity: bool = True, queue_size: int = 50_000,
                 tau: float = 0.009, sim_weight: float = 1.0) -> None:
        super().__init__(ctx, ce_weight=0.0)
        self.similarity, self.tau, self.sim_weight = similarity, tau, sim_weight
        self.queue = MemoryQueue(queue_size, ctx.teacher.embed_dim)

    def prefill_size(self) -> int:
        """A full queue of cached embeddings before step one (method notes); none without L_sim."""
        return self.queue.length if self.similarity else 0

    def prefill(self, pooled_bd: Tensor) -> None:
        """Fill the queue from cached pooled embeddings before step one (method notes)."""
        self.queue.push(pooled_bd.to(self.queue.embeddings_ld.device), gather=False)

    def forward(self, student: NetOutputs, teacher: NetOutputs, labels_b: Tensor | None = None,
                index_b: Tensor | None = None) -> dict[str, Tensor]:
        teacher = teacher.detach().float()
        tokens_bnc = student.tokens.float()
        terms = {"mse": masked_mse(tokens_bnc, teacher.tokens, teacher.valid)}
        if self.similarity:
            self.queue.push(teacher.pooled)
            terms["sim"] = self.sim_weight * similarity_loss(
                teacher.pooled, pooled_embedding(tokens_bnc, teacher.valid), self.queue.contents(), self.tau)
        return with_total(terms)
