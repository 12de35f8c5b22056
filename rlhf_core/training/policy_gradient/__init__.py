"""On-policy RL (book ch.6): REINFORCE, RLOO, PPO, GRPO and its variants from one loop."""
