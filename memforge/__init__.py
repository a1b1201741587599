"""memforge: build, version and read MLP Memory training data."""
