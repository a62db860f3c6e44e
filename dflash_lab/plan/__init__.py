"""`dflash-lab plan`: the memory and cost of a recipe's training step, worked out without a GPU.

    dflash-lab plan --config recipes/qwen3-4b/m1.yaml --gpus 8 --gpu-memory 80GB

The recipe's target and draft are built with fake tensors (`FakeTensorMode`: shapes and dtypes,
no storage), and ONE training micro-step of the trainer's own code runs on them: the target's
batched forward (the GPU path of `FeatureSource`), `trainer.forward_batch` (anchors, blocks, the
draft, the loss stage), backward, gradient clipping and the AdamW step. `MemTracker` records the
peak by kind (weights, gradients, optimizer state, activations, temporaries) and `FlopCounterMode`
counts the FLOPs. Sequences are at `data.max_length` (the worst case a batch can hold).

Three things make the trainer's code run on fake tensors (SPEC section 9):
- Batch building is data-dependent (anchor sampling, boolean masks over valid slots). `_RealIndices`
  runs every op whose inputs are all real for real (token ids, anchors, labels, masks: small), turns a
  real boolean mask that indexes a fake tensor into real integer indices, and reads 1 for a scalar of
  a fake tensor (the logged statistics, AdamW's step count).
- Flex attention does not run under fake tensors on this build: `_FlexStandIn` allocates what flex
  keeps for backward (its bf16 q, k, v, the output and the [N, H, Q] logsumexp) and counts the FLOPs
  of the visible (query, key) pairs.
- Fake CUDA tensors fail on small factory calls, so everything is fake CPU with CPU autocast (bf16).
  CUDA's autocast casts a few ops differently from CPU's; the plan says so beside its figures.

Not in the tracked step, added by arithmetic: DDP's gradient buckets (one fp32 copy of the draft's
gradients when --gpus > 1) and, with `target.fsdp`, the sharding of the target's decoder layers.
Not counted at all: the CUDA context and the caching allocator's fragmentation (keep a margin; the
qwen3-4b recipes are sized to at most 72 GB of an 80 GB GPU).

The package (it sits above `train/`: it runs the trainer's step, the trainer never imports it):
    models.py      the recipe's target and draft from configs alone, synthetic samples, MoE/hybrid facts
    fake_step.py   one micro-step under fake tensors: peak memory by kind and FLOPs (`measure_step`)
    memory.py      the plan: what one process cannot see, the fit, the largest micro-batch (`make_plan`)
    report.py      the plan as text or JSON
    commands.py    `dflash-lab plan`
"""

from dflash_lab.plan.fake_step import KIND_ORDER, FlopTally, StepMeasure, measure_step, visible_attention_pairs
from dflash_lab.plan.memory import Plan, feature_cache_size, make_plan
from dflash_lab.plan.models import GB, GIB, KNOWN_TARGETS, parse_memory, synthetic_samples, target_config, \
    target_layer_kinds
from dflash_lab.plan.report import format_plan, plan_json

__all__ = ["KNOWN_TARGETS", "KIND_ORDER", "GB", "GIB", "Plan", "StepMeasure", "FlopTally", "make_plan", "measure_step",
           "format_plan", "plan_json", "parse_memory", "target_config", "target_layer_kinds", "feature_cache_size",
           "synthetic_samples", "visible_attention_pairs"]
