"""Evaluation as a stream of (images, features) batches: metrics, extractors, reference statistics, cached
scores and paired statistics."""
