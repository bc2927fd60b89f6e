"""The offline demo's data tools: synthetic captioned images and the loopback HTTP server that
serves them (also what the tests and benchmarks use). `python -m curate.pipeline.demo` runs the demo."""
