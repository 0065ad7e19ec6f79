"""Inference: how a trained model runs for decoding and scoring on a platform.

`plan` (`InferencePlan`, `plan_for`, the one platform switch `CPU_CONVERTS_DOT_OPERANDS`),
`runner` (`prepare`, `PlannedLM`; quantize-once weights are the frozen formats of
`nn.packed.PackedLM`), `loops` (the in-place and ordered layer loops), `memory`
(generation's memory estimate and check), `sampling` (`SamplingConfig`, `sample_from_logits`).
"""

from mmfree_jax.infer.plan import CPU_CONVERTS_DOT_OPERANDS, InferencePlan, plan_for  # noqa: F401
from mmfree_jax.infer.runner import PlannedLM, prepare, prepare_for_decoding, prepare_for_scoring  # noqa: F401
