"""Datasets: download, split preparation, vocabularies and batch iterators."""
