"""Command-line entry of hamjax.bench.packed_step (usage in its docstring); `hamjax bench` runs the whole suite."""

from hamjax.bench.packed_step import main

if __name__ == "__main__":
    main()
