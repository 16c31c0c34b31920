"""Serving: the Predictor that loads a run and predicts on raw inputs."""
