"""Analysis: what a recorded store says — the sink rule, trajectory metrics and figures."""
