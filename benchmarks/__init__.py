"""Side-by-side speed measurements against PyTorch peers. Each script runs alone (`python benchmarks/NAME.py`);
`python -m benchmarks` runs the CPU ones, each in its own process, and writes docs/performance.md's table."""
