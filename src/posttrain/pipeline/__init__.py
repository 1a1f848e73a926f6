"""Chaining stages: ``stages`` runs pretrain -> SFT -> DPO -> GRPO (or SFT -> reward model -> PPO) with
evaluation between stages and picks each stage's starting and reference model; ``pairs`` builds preference
pairs from a model's own samples and a verifier (make-pairs); ``evidence`` runs the demo's controls and
per-seed tables.

May import: recipes and everything below them; never ``commands``.
"""

from posttrain.pipeline.stages import PipelineConfig, StagePlan, format_table, load_pipeline, plan, run

__all__ = ["PipelineConfig", "StagePlan", "format_table", "load_pipeline", "plan", "run"]
