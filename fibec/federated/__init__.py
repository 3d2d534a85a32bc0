"""Federated FibecFed: engine-neutral client/server logic and the engines that run it."""
