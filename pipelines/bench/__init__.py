"""The benchmarks behind ``python -m pipelines.benchmark NAME``, one module each; `gallery`
holds the synthetic galleries two of them share."""
