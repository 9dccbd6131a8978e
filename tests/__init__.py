"""The test suite, a package so that ``tests.anomalib_oracle`` (the anomalib reference the tests and the
benchmarks share) is importable from the repository root, and so that pytest puts that root on ``sys.path``."""
