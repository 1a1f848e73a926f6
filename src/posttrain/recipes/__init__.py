"""The recipes: one file per method, each a top-to-bottom ``train(cfg)`` that reads like the algorithm
(pretrain, sft, preference: DPO / IPO / SimPO / KTO / ORPO, reward_model, grpo, ppo).

May import: rl, report, run, evaluation and everything below; a recipe may reuse another's named pieces
(PPO takes GRPO's step batch, preference and reward_model take SFT's data split). Never imports pipeline or
commands.
"""
