"""Continual learning: streams of tasks, the accuracy matrix and its metrics, comparison of methods."""
