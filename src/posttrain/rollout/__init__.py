"""Generation engines behind one small interface. Nothing downstream depends on which made a rollout."""

from posttrain.rollout.engine import Generation, HFEngine, RolloutEngine

__all__ = ["Generation", "HFEngine", "RolloutEngine"]
